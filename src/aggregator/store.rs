//! The durable ledger: SQLite (WAL, synchronous=FULL, exclusive locking). Sealed minutes,
//! open minutes and late sums are written every round in one transaction; the hosts'
//! checkpoints (their last counters) only every `--storage.host-checkpoint-interval`
//! and at a clean stop, since they are most of the bytes. A restart after a crash finds
//! host checkpoints older than the minutes: those hosts re-baseline (see [`Store::load`]).
//!
//! The directory is guarded: `lock` (flock, held for the process's life, naming its
//! holder) keeps a second writer out, and `ledger.id` (written when a ledger is created)
//! tells a lost or replaced `ledger.sqlite3` from a first start.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};

use super::books::Commit;
use crate::clock;
use crate::ledger::{
    minute_of, Cause, Gap, HostState, Kind, Open, Sealed, Snapshot, Totals, MINUTE_MS,
};

/// The schema this binary writes. Older databases are migrated at open; a newer one is
/// refused rather than misread.
/// 4: the `gaps` table (delivery gaps, [`write_gaps`]). 7: the team book (the minutes'
/// `allocated`, `team_minutes`, their all-time sums `team_totals`, `open_teams`;
/// [`migrate_v6`]).
pub const SCHEMA_VERSION: i64 = 7;

/// No stored figure of one minute can exceed this many GPU-ms (about 18 million GPUs of
/// a minute each); a row above it, or a negative one, is corruption.
pub const MAX_MINUTE_GPU_MS: i64 = 1 << 50;

/// The database file inside `--storage.path`.
pub const DB_FILE: &str = "ledger.sqlite3";
/// The identity marker written beside it when a ledger is created.
pub const MARKER_FILE: &str = "ledger.id";
/// flock(2)ed for the process's life; its content names the holder.
pub const LOCK_FILE: &str = "lock";
/// Written by `commitmeter ledger backup` for the running process to answer.
pub const BACKUP_REQUEST: &str = "backup.request";
/// The running process's answer to a backup request.
pub const BACKUP_DONE: &str = "backup.done";

/// How far past now a ledger may be sealed before it is refused: a minute seals `grace`
/// after it ends, so a sane ledger is sealed through a minute in the past.
pub const FUTURE_TOLERANCE_MS: i64 = 10 * 60_000;

/// Default of `--storage.host-checkpoint-interval`.
pub const DEFAULT_HOST_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(3600);

/// SQLite's own words, and for a value of the wrong type (a REAL where the ledger writes
/// integers) what that means: the file was not written by commitmeter.
fn describe(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::InvalidColumnType(_, name, ty) => format!(
            "{e}: column {name:?} holds a {ty} value where commitmeter writes integers, so this \
             is not a ledger commitmeter wrote (restore a backup, or move the file away)"
        ),
        _ => e.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ledger database {path}: {}", describe(.source))]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("ledger database {path}: cannot create its directory: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ledger database {path}: cannot read it: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("ledger directory lock {path}: {error}; the ledger directory must be writable (read-only storage?)")]
    LockFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("ledger directory {dir} is in use by another commitmeter ({holder}; lock file {lock}); stop it first, or give this one its own directory")]
    Locked {
        dir: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    #[error("{path}: {reason}")]
    Marker { path: PathBuf, reason: String },
    #[error("ledger database {path}: {what}, but {marker} says ledger {id} (created {created}) lived here; refusing to start a new ledger in its place silently. Restore it from a backup (README, \"Backup and restore\"), or start a new, empty ledger with --storage.create-new (the old files are moved to a replaced-<time> directory beside it)")]
    Lost {
        path: PathBuf,
        what: String,
        marker: PathBuf,
        id: String,
        created: String,
    },
    #[error("ledger database {path}: {what}: not a commitmeter ledger; refusing to touch it. Point --storage.path elsewhere, or start a new ledger with --storage.create-new (the file is moved to a replaced-<time> directory beside it)")]
    Foreign { path: PathBuf, what: String },
    #[error("--storage.create-new: {path} holds a valid ledger ({id}); refusing to replace it. Move the directory away yourself to start over")]
    Valid { path: PathBuf, id: String },
    #[error("ledger directory {dir}: {reason}")]
    Kind { dir: PathBuf, reason: String },
    #[error("ledger database {path}: sealed through {sealed} but the clock says {now}: a clock that ran ahead sealed minutes in the future, and nothing would seal until it is that time again. Fix the clock, or start once with --storage.discard-future-minutes to drop the {count} minutes sealed after now")]
    Future {
        path: PathBuf,
        sealed: String,
        now: String,
        count: i64,
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
    #[error("ledger backup to {output}: {reason}")]
    Backup { output: PathBuf, reason: String },
}

/// Who opens a ledger directory: recorded in the lock file and the ledger's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Aggregator,
    Demo,
    /// `commitmeter ledger backup` of a stopped ledger.
    Backup,
    /// `commitmeter statement` reading a stopped ledger.
    Statement,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Aggregator => "aggregator",
            Role::Demo => "demo",
            Role::Backup => "ledger backup",
            Role::Statement => "statement",
        }
    }
}

/// How a ledger directory is opened (the `--storage.*` flags).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub role: Role,
    /// `--storage.create-new`: replace a lost, empty or foreign ledger with a new one.
    pub create_new: bool,
    /// `--storage.discard-future-minutes`: drop minutes sealed after now.
    pub discard_future: bool,
    /// `--storage.host-checkpoint-interval`: how often hosts' checkpoints are written
    /// (zero: every commit).
    pub host_checkpoint_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            role: Role::Aggregator,
            create_new: false,
            discard_future: false,
            host_checkpoint_interval: DEFAULT_HOST_CHECKPOINT_INTERVAL,
        }
    }
}

/// The exclusive lock on a ledger directory, released when the process ends (or this
/// is dropped); the kernel drops it on `kill -9` too, so no stale lock outlives its holder.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Provenance stamps of ledger files are this machine's wall clock, not the ledger's
/// (the demo's simulated clock never names a file or dates a ledger).
fn now_rfc3339() -> String {
    clock::wall_now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| String::new(), |t| t.to_string())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl DirLock {
    /// Takes `dir/lock` or says who holds it.
    pub fn acquire(dir: &Path, role: Role) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.join(DB_FILE),
            source,
        })?;
        let path = dir.join(LOCK_FILE);
        let lock_err = |error| StoreError::LockFile {
            path: path.clone(),
            error,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .map(|s| s.trim().replace('\n', ", "))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "a process that has not written its name yet".into());
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                    lock: path,
                    holder,
                });
            }
            Err(e) => return Err(lock_err(e.into())),
        }
        let me = format!(
            "pid {}\nhost {}\nrole commitmeter {}\nstarted {}\n",
            std::process::id(),
            hostname(),
            role.as_str(),
            now_rfc3339()
        );
        file.set_len(0)
            .and_then(|()| file.write_all(me.as_bytes()))
            .map_err(lock_err)?;
        Ok(Self { _file: file })
    }
}

/// The identity of a ledger, kept in `ledger.id` and in the database's `meta`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    id: u64,
    demo: bool,
    created: String,
}

impl Identity {
    fn new(role: Role) -> Self {
        let mut b = [0u8; 8];
        let id = match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b) {
            Ok(()) => u64::from_le_bytes(b),
            // No system randomness: the wall clock's nanoseconds instead.
            Err(_) => clock::wall_now().as_nanosecond() as u64,
        };
        Self {
            id,
            demo: role == Role::Demo,
            created: now_rfc3339(),
        }
    }

    fn id_str(&self) -> String {
        format!("{:016x}", self.id)
    }

    fn kind(&self) -> &'static str {
        if self.demo {
            "demo"
        } else {
            "aggregator"
        }
    }

    fn read_marker(dir: &Path) -> Result<Option<Self>, StoreError> {
        let path = dir.join(MARKER_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Marker {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let field = |key: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        let bad = |reason: &str| {
            StoreError::Marker {
            path: path.clone(),
            reason: format!("{reason}; it should hold the id, creation time and kind of the ledger beside it (restore it from a backup, or remove it to adopt the ledger.sqlite3 beside it)"),
        }
        };
        let id = field("id")
            .and_then(|s| u64::from_str_radix(&s, 16).ok())
            .ok_or_else(|| bad("no valid `id`"))?;
        let demo = match field("kind").as_deref() {
            Some("demo") => true,
            Some("aggregator") => false,
            _ => return Err(bad("no valid `kind` (aggregator or demo)")),
        };
        Ok(Some(Self {
            id,
            demo,
            created: field("created").unwrap_or_default(),
        }))
    }

    /// Written atomically (temporary file, fsync, rename, fsync of the directory).
    fn write_marker(&self, dir: &Path) -> Result<(), StoreError> {
        let path = dir.join(MARKER_FILE);
        let tmp = dir.join(format!("{MARKER_FILE}.tmp"));
        let text = format!(
            "# commitmeter ledger identity: the ledger.sqlite3 beside this file must carry this id.\n\
             # Do not delete it: it is how commitmeter tells a lost ledger from a first start.\n\
             id = \"{}\"\ncreated = \"{}\"\nkind = \"{}\"\n",
            self.id_str(),
            self.created,
            self.kind()
        );
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        };
        write().map_err(|e| StoreError::Marker {
            path,
            reason: format!("cannot write: {e}"),
        })
    }
}

/// What is at the database's path before it is opened for writing.
enum Found {
    Absent,
    Empty,
    NotSqlite,
    /// A SQLite file with no commitmeter `meta` table: `Some(tables)` (0: empty).
    OtherSqlite(i64),
    /// A commitmeter ledger without an identity (older versions, or one whose first
    /// writes were lost with its WAL).
    NoIdentity,
    Ledger(Identity),
}

/// The one place a SQLite database is opened (`clippy.toml` disallows
/// `Connection::open*` elsewhere): every connection gets the same locking and pragmas.
#[allow(clippy::disallowed_methods)]
fn sqlite_conn(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // Exclusive locking before the first access keeps the WAL index in heap memory
    // instead of a mmapped -shm file (no SIGBUS when the disk fails), and no mmap I/O.
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    conn.pragma_update(None, "mmap_size", 0)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

fn meta_value(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn inspect(path: &Path) -> Result<Found, StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 16];
    let n = match File::open(path) {
        Ok(mut f) => {
            use std::io::Read as _;
            let mut n = 0;
            while n < head.len() {
                match f.read(&mut head[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(error) => {
                        return Err(StoreError::Read {
                            path: path.to_path_buf(),
                            error,
                        })
                    }
                }
            }
            n
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Absent),
        Err(error) => {
            return Err(StoreError::Read {
                path: path.to_path_buf(),
                error,
            })
        }
    };
    if n == 0 {
        return Ok(Found::Empty);
    }
    if &head[..n] != b"SQLite format 3\0" {
        return Ok(Found::NotSqlite);
    }
    let conn = sqlite_conn(path).map_err(sql)?;
    let tables: rusqlite::Result<i64> = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
        [],
        |r| r.get(0),
    );
    let tables = match tables {
        Ok(t) => t,
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::NotADatabase =>
        {
            return Ok(Found::NotSqlite)
        }
        Err(e) => return Err(sql(e)),
    };
    let has_meta: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    if has_meta == 0 {
        return Ok(Found::OtherSqlite(tables));
    }
    let Some(id) = meta_value(&conn, "ledger_id").map_err(sql)? else {
        return Ok(Found::NoIdentity);
    };
    let demo = meta_value(&conn, "demo").map_err(sql)?.unwrap_or(0) != 0;
    let created = meta_value(&conn, "created")
        .map_err(sql)?
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map(|t| t.to_string())
        .unwrap_or_default();
    Ok(Found::Ledger(Identity {
        id: id as u64,
        demo,
        created,
    }))
}

/// Moves a ledger's files into `dir/replaced-<time>/` (for `--storage.create-new`).
fn move_aside(dir: &Path) -> Result<PathBuf, StoreError> {
    let stamp = clock::wall_now().strftime("%Y%m%dT%H%M%SZ").to_string();
    let aside = dir.join(format!("replaced-{stamp}"));
    let io = |source| StoreError::Dir {
        path: aside.clone(),
        source,
    };
    std::fs::create_dir_all(&aside).map_err(io)?;
    for name in [
        DB_FILE.to_string(),
        format!("{DB_FILE}-wal"),
        format!("{DB_FILE}-shm"),
        format!("{DB_FILE}-journal"),
        MARKER_FILE.to_string(),
    ] {
        match std::fs::rename(dir.join(&name), aside.join(&name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
    }
    Ok(aside)
}

/// What the last commit wrote (for tests and the log).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Whether the hosts' checkpoints were written.
    pub hosts_checkpointed: bool,
    /// Host rows inserted or updated (only those whose state changed).
    pub host_rows_written: usize,
    pub host_rows_deleted: usize,
}

/// A snapshot's host states: (target, contract index, state).
type HostRows = Vec<(String, usize, HostState)>;

pub struct Store {
    conn: Connection,
    path: PathBuf,
    dir: PathBuf,
    opts: StoreOptions,
    _lock: DirLock,
    /// Commits so far (meta `commit_seq`); `hosts_seq` is the commit whose hosts are stored.
    seq: i64,
    /// When the hosts' checkpoints were last written by this process.
    hosts_written_at: Option<Instant>,
    /// Hash of each stored host row's state, once this process has written them all.
    written: Option<HashMap<(String, String), u64>>,
    /// The host states of the last commit when they were not written with it: written at
    /// the next checkpoint, or by [`Store::flush`] at a clean stop.
    unwritten: Option<(Vec<String>, HostRows)>,
    last: CommitStats,
    checkpoint_failing: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS minutes (
    contract TEXT NOT NULL, minute INTEGER NOT NULL,
    committed INTEGER NOT NULL, delivered INTEGER NOT NULL, used INTEGER NOT NULL,
    idle INTEGER NOT NULL, undelivered INTEGER NOT NULL, unreported INTEGER NOT NULL,
    overage INTEGER NOT NULL,
    idle_unallocated INTEGER NOT NULL, idle_allocated INTEGER NOT NULL,
    allocated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (contract, minute)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS open_minutes (
    contract TEXT NOT NULL, minute INTEGER NOT NULL,
    delivered INTEGER NOT NULL, used INTEGER NOT NULL, reported INTEGER NOT NULL,
    expected INTEGER NOT NULL, held INTEGER NOT NULL, allocated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (contract, minute)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS team_minutes (
    contract TEXT NOT NULL, minute INTEGER NOT NULL, team TEXT NOT NULL,
    allocated_ms INTEGER NOT NULL, used_ms INTEGER NOT NULL,
    PRIMARY KEY (contract, minute, team)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS team_totals (
    contract TEXT NOT NULL, team TEXT NOT NULL,
    allocated_ms INTEGER NOT NULL, used_ms INTEGER NOT NULL,
    PRIMARY KEY (contract, team)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS open_teams (
    contract TEXT NOT NULL, minute INTEGER NOT NULL, team TEXT NOT NULL,
    allocated_ms INTEGER NOT NULL, used_ms INTEGER NOT NULL,
    PRIMARY KEY (contract, minute, team)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hosts (
    target TEXT NOT NULL, contract TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (target, contract)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS late (
    contract TEXT PRIMARY KEY, delivered INTEGER NOT NULL, used INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS contracts (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS late_minutes (
    contract TEXT NOT NULL, minute INTEGER NOT NULL, commit_seq INTEGER NOT NULL,
    delivered INTEGER NOT NULL, used INTEGER NOT NULL,
    PRIMARY KEY (contract, minute, commit_seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    contract TEXT NOT NULL, start_ms INTEGER NOT NULL, target TEXT NOT NULL, gpu TEXT NOT NULL,
    end_ms INTEGER, cause TEXT NOT NULL, short_gpu_ms INTEGER NOT NULL, xids TEXT NOT NULL,
    PRIMARY KEY (contract, start_ms, target, gpu)) WITHOUT ROWID;
";

/// Versions 1 to 5 (before the idle split): sealed minutes gain `idle_unallocated = idle`
/// and `idle_allocated = 0` (minutes sealed before the upgrade count all idle as
/// unallocated: no evidence of held GPUs was kept for them), open minutes `held = 0` (their
/// idle so far counts unallocated). Runs after [`migrate_v1`] for a version 1 database.
/// A table the database lacks (one whose first commit never reached the main file) is
/// left to `SCHEMA`, which creates it whole.
fn migrate_v5(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let lacks = |table: &str, column: &str| -> rusqlite::Result<bool> {
        let (tables, columns): (i64, i64) = tx.query_row(
            "SELECT (SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1),
                    (SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2)",
            params![table, column],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(tables > 0 && columns == 0)
    };
    if lacks("minutes", "idle_unallocated")? {
        tx.execute_batch(
            "ALTER TABLE minutes ADD COLUMN idle_unallocated INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE minutes ADD COLUMN idle_allocated INTEGER NOT NULL DEFAULT 0;
             UPDATE minutes SET idle_unallocated = idle;",
        )?;
    }
    if lacks("open_minutes", "held")? {
        tx.execute_batch("ALTER TABLE open_minutes ADD COLUMN held INTEGER NOT NULL DEFAULT 0;")?;
    }
    Ok(())
}

/// Versions 1 to 6 (before the team book): sealed and open minutes gain `allocated = 0`
/// (no allocated time was kept for them, so they have no team rows: the team series start
/// at the upgrade); `team_minutes`, `team_totals` and `open_teams` are created by `SCHEMA`. Runs after
/// [`migrate_v5`].
fn migrate_v6(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    for table in ["minutes", "open_minutes"] {
        let (tables, columns): (i64, i64) = tx.query_row(
            "SELECT (SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1),
                    (SELECT count(*) FROM pragma_table_info(?1) WHERE name = 'allocated')",
            params![table],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if tables > 0 && columns == 0 {
            tx.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN allocated INTEGER NOT NULL DEFAULT 0;"
            ))?;
        }
    }
    Ok(())
}

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
                            ..Default::default()
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
    /// Opens (or creates) `dir/ledger.sqlite3` as the aggregator, with default options.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, &StoreOptions::default())
    }

    /// Locks `dir`, checks that the database there is the ledger `ledger.id` names (or
    /// that there is none yet), and opens it, migrating an older schema.
    pub fn open_with(dir: &Path, opts: &StoreOptions) -> Result<Self, StoreError> {
        let path = dir.join(DB_FILE);
        let lock = DirLock::acquire(dir, opts.role)?;
        let marker = Identity::read_marker(dir)?;
        let marker_path = dir.join(MARKER_FILE);
        let found = inspect(&path)?;
        let lost = |m: &Identity, what: &str| StoreError::Lost {
            path: path.clone(),
            what: what.to_string(),
            marker: marker_path.clone(),
            id: m.id_str(),
            created: m.created.clone(),
        };
        // What this directory holds: `Ok(Some)` a ledger to open, `Ok(None)` nothing yet.
        let verdict: Result<Option<Identity>, StoreError> = match (&marker, found) {
            (None, Found::Absent | Found::Empty | Found::OtherSqlite(0)) => Ok(None),
            (None, Found::Ledger(id)) => {
                id.write_marker(dir)?;
                tracing::info!(path = %path.display(), ledger = %id.id_str(), marker = %marker_path.display(), "ledger found without its identity marker (restored or copied): marker written");
                Ok(Some(id))
            }
            (None, Found::NoIdentity) => Ok(Some(Identity::new(opts.role))),
            (None, Found::NotSqlite) => Err(StoreError::Foreign {
                path: path.clone(),
                what: "not a SQLite database".into(),
            }),
            (None, Found::OtherSqlite(n)) => Err(StoreError::Foreign {
                path: path.clone(),
                what: format!("another application's SQLite database ({n} tables, no commitmeter meta table)"),
            }),
            (Some(m), Found::Absent) => Err(lost(m, "the file is missing")),
            (Some(m), Found::Empty) => Err(lost(m, "the file is empty (0 bytes)")),
            (Some(m), Found::NotSqlite) => Err(lost(m, "the file is not a SQLite database")),
            (Some(m), Found::OtherSqlite(_)) => {
                Err(lost(m, "the file is another SQLite database, not a commitmeter ledger"))
            }
            (Some(m), Found::NoIdentity) => Err(lost(
                m,
                "the file carries no ledger identity: its first writes were lost (its -wal file deleted after a crash?)",
            )),
            (Some(m), Found::Ledger(id)) if id.id != m.id => Err(lost(
                m,
                &format!("the file is another ledger ({}, created {})", id.id_str(), id.created),
            )),
            (Some(_), Found::Ledger(id)) => Ok(Some(id)),
        };
        let identity = match verdict {
            Ok(Some(id)) if opts.create_new => {
                return Err(StoreError::Valid {
                    path: path.clone(),
                    id: id.id_str(),
                })
            }
            Ok(existing) => existing,
            Err(e @ (StoreError::Lost { .. } | StoreError::Foreign { .. })) if opts.create_new => {
                let aside = move_aside(dir)?;
                tracing::warn!(path = %path.display(), moved_to = %aside.display(), reason = %e, "--storage.create-new: the old ledger files were moved aside; starting a new ledger");
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(id) = &identity {
            let refuse = match (opts.role, id.demo) {
                (Role::Demo, false) => Some("it holds a production (aggregator) ledger; `commitmeter demo --data.dir` only uses a demo's ledger or an empty directory"),
                (Role::Aggregator, true) => Some("it holds a ledger written by `commitmeter demo` (simulated time and fleet); the aggregator refuses it. Use another --storage.path"),
                _ => None,
            };
            if let Some(reason) = refuse {
                return Err(StoreError::Kind {
                    dir: dir.to_path_buf(),
                    reason: reason.to_string(),
                });
            }
        }

        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut conn = sqlite_conn(&path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
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
            meta_value(&conn, "schema_version").map_err(sql)?
        } else {
            None
        };
        let (identity, created) = match identity {
            Some(id) => (id, false),
            None => (Identity::new(opts.role), true),
        };
        let tx = conn.transaction().map_err(sql)?;
        match version {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::Newer {
                    path: path.clone(),
                    found: v,
                })
            }
            Some(SCHEMA_VERSION) => {}
            Some(v) => {
                tracing::info!(path = %path.display(), from = v, to = SCHEMA_VERSION, "migrating the ledger database");
                migrate_v5(&tx).map_err(sql)?;
                migrate_v6(&tx).map_err(sql)?;
            }
            None if has_meta => {
                tracing::info!(path = %path.display(), from = 1, to = SCHEMA_VERSION, "migrating the ledger database");
                migrate_v1(&tx).map_err(sql)?;
                migrate_v5(&tx).map_err(sql)?;
                migrate_v6(&tx).map_err(sql)?;
            }
            None => {}
        }
        // Every table is `IF NOT EXISTS`: creates a new ledger, and adds versions 3's,
        // 4's (`gaps`) and 5's (`late_minutes`: late GPU-ms that arrived before version 5
        // stay in the all-time `late` sums only, with no minute).
        tx.execute_batch(SCHEMA).map_err(sql)?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
            params![SCHEMA_VERSION],
        )
        .map_err(sql)?;
        tx.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('ledger_id', ?1), ('demo', ?2), ('created', ?3)",
            params![
                identity.id as i64,
                i64::from(identity.demo),
                clock::wall_now().as_second()
            ],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        let seq = meta_value(&conn, "commit_seq").map_err(sql)?.unwrap_or(0);
        let mut store = Self {
            conn,
            path: path.clone(),
            dir: dir.to_path_buf(),
            opts: opts.clone(),
            _lock: lock,
            seq,
            hosts_written_at: None,
            written: None,
            unwritten: None,
            last: CommitStats::default(),
            checkpoint_failing: false,
        };
        // The identity is in the main file before the marker names it: a ledger never
        // lives only in its WAL.
        store.checkpoint_wal();
        if created || marker.is_none() {
            identity.write_marker(dir)?;
        }
        if created {
            tracing::info!(path = %path.display(), ledger = %identity.id_str(), kind = identity.kind(), "new ledger created");
        }
        Ok(store)
    }

    /// Copies the WAL into the main file and truncates it, so the database file alone
    /// holds every commit (a deleted WAL loses at most the commit in flight).
    fn checkpoint_wal(&mut self) {
        let r: rusqlite::Result<i64> =
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0));
        match r {
            Ok(0) => {
                if self.checkpoint_failing {
                    tracing::info!(path = %self.path.display(), "ledger WAL checkpoints work again");
                }
                self.checkpoint_failing = false;
            }
            Ok(_) | Err(_) if self.checkpoint_failing => {}
            Ok(_) => {
                self.checkpoint_failing = true;
                tracing::warn!(path = %self.path.display(), "ledger WAL checkpoint could not complete; retried after each commit");
            }
            Err(e) => {
                self.checkpoint_failing = true;
                tracing::warn!(path = %self.path.display(), error = %e, "ledger WAL checkpoint failed; retried after each commit");
            }
        }
    }

    /// Refuses a ledger sealed through a minute beyond now (plus [`FUTURE_TOLERANCE_MS`]),
    /// or with `--storage.discard-future-minutes` drops the minutes sealed from now on,
    /// the open minutes and the hosts' checkpoints (taken on the wrong clock), logged.
    pub fn check_clock(&mut self, now_ms: i64) -> Result<(), StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let Some(through) = meta_value(&self.conn, "sealed_through").map_err(sql)? else {
            return Ok(());
        };
        if through.saturating_mul(MINUTE_MS) <= now_ms.saturating_add(FUTURE_TOLERANCE_MS) {
            return Ok(());
        }
        let first = minute_of(now_ms);
        let count: i64 = self
            .conn
            .query_row(
                "SELECT count(DISTINCT minute) FROM minutes WHERE minute >= ?1",
                [first],
                |r| r.get(0),
            )
            .map_err(sql)?;
        let at = |ms: i64| {
            jiff::Timestamp::from_millisecond(ms)
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        if !self.opts.discard_future {
            return Err(StoreError::Future {
                path: self.path.clone(),
                sealed: at(through.saturating_mul(MINUTE_MS)),
                now: at(now_ms),
                count,
            });
        }
        let since = meta_value(&self.conn, "since")
            .map_err(sql)?
            .unwrap_or(first);
        let tx = self.conn.transaction().map_err(sql)?;
        tx.execute("DELETE FROM minutes WHERE minute >= ?1", [first])
            .map_err(sql)?;
        tx.execute("DELETE FROM team_minutes WHERE minute >= ?1", [first])
            .map_err(sql)?;
        tx.execute_batch(
            "DELETE FROM team_totals;
             INSERT INTO team_totals (contract, team, allocated_ms, used_ms)
                 SELECT contract, team, SUM(allocated_ms), SUM(used_ms) FROM team_minutes
                 GROUP BY contract, team;",
        )
        .map_err(sql)?;
        tx.execute("DELETE FROM open_minutes", []).map_err(sql)?;
        tx.execute("DELETE FROM open_teams", []).map_err(sql)?;
        tx.execute("DELETE FROM hosts", []).map_err(sql)?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('sealed_through', ?1), ('since', ?2), ('hosts_seq', ?3)",
            params![first, since.min(first), self.seq],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        self.checkpoint_wal();
        tracing::warn!(
            path = %self.path.display(),
            discarded_minutes = count,
            from = %at(first * MINUTE_MS),
            was_sealed_through = %at(through * MINUTE_MS),
            "--storage.discard-future-minutes: dropped the minutes sealed in the future; counters of the contracts go down by their figures, and every host re-baselines (dark until read)"
        );
        Ok(())
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
        let figures = kind_columns(str::to_string);
        let bad: Option<(String, i64, String)> = self
            .conn
            .query_row(
                &format!(
                    "SELECT contract, minute, CASE
                    WHEN min({figures}) < 0 THEN 'a negative figure'
                    WHEN max({figures}) > ?1 THEN 'a figure out of range'
                    WHEN overage > used THEN 'overage above used'
                    WHEN idle != idle_unallocated + idle_allocated
                        THEN 'idle != idle_unallocated + idle_allocated'
                    WHEN allocated < 0 OR allocated > ?1 THEN 'allocated out of range'
                    ELSE 'committed != used - overage + idle + undelivered + unreported' END
                 FROM minutes
                 WHERE min({figures}) < 0
                    OR max({figures}) > ?1
                    OR allocated < 0 OR allocated > ?1
                    OR overage > used
                    OR idle != idle_unallocated + idle_allocated
                    OR committed != used - overage + idle + undelivered + unreported
                 LIMIT 1"
                ),
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
                     WHERE min(delivered, used, reported, expected, held, allocated) < 0
                        OR max(delivered, used, reported, expected, held, allocated) > ?1
                     LIMIT 1",
                    params![MAX_MINUTE_GPU_MS],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(|e| self.err(e))?,
        };
        // Team time: the open minutes' rows and the all-time sums (a few rows per team)
        // non-negative and used <= allocated. The sealed rows themselves are not scanned at
        // start (50 teams make them 50 times the minutes); they were written with their
        // minute, and their sums are the ones checked.
        let bad = match bad {
            Some(b) => Some(b),
            None => self
                .conn
                .query_row(
                    "SELECT contract, minute, 'team ' || team || ': a negative or out-of-range figure, or used above allocated'
                     FROM (SELECT contract, minute, team, allocated_ms, used_ms, 1 AS open FROM open_teams
                           UNION ALL SELECT contract,
                               (SELECT COALESCE(max(minute), 0) FROM team_minutes m
                                WHERE m.contract = t.contract),
                               team || ' (all-time sums)', allocated_ms, used_ms, 0 FROM team_totals t)
                     WHERE min(allocated_ms, used_ms) < 0 OR (open AND allocated_ms > ?1)
                        OR used_ms > allocated_ms
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
    /// `None` for a new database. Checks the stored figures first, and records `ids` as
    /// the ledger's contracts (logging a change).
    ///
    /// Host checkpoints older than the last commit (a crash between two host
    /// checkpoints) are not used as baselines: their counters are from before minutes
    /// that were sealed since, so each such host re-baselines at its next reading, dark
    /// (its contract's shortfall unreported) until then. Nothing is counted twice.
    pub fn load(&self, ids: &[String]) -> Result<Option<Snapshot>, StoreError> {
        self.record_contracts(ids)?;
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
                "SELECT contract, minute, delivered, used, reported, expected, held, allocated FROM open_minutes",
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
                        held: r.get(6)?,
                        allocated: r.get(7)?,
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
            .prepare("SELECT contract, minute, team, allocated_ms, used_ms FROM open_teams ORDER BY minute, contract, team")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (id, minute, team, a, u) = row.map_err(|e| self.err(e))?;
            if let Some(c) = index(&id) {
                snap.open_teams.push((minute, c, team, a, u));
            }
        }
        snap.open_teams
            .sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
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
        let seq = |key| meta_value(&self.conn, key).map_err(|e| self.err(e));
        if let (Some(commit), Some(hosts)) = (seq("commit_seq")?, seq("hosts_seq")?) {
            if commit != hosts && !snap.hosts.is_empty() {
                for (_, _, h) in &mut snap.hosts {
                    h.last = None;
                    h.sized_since_ms = None;
                    h.carry = [0, 0];
                    h.carry_held = 0;
                    h.carry_teams.clear();
                }
                tracing::warn!(
                    path = %self.path.display(),
                    hosts = snap.hosts.len(),
                    commits_behind = commit - hosts,
                    "the aggregator did not stop cleanly: host checkpoints are older than the sealed minutes, so each host re-baselines at its next reading; until then its contract's shortfall is unreported"
                );
            }
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

    /// Records the contract ids this ledger is kept for, logging ids that appeared or
    /// disappeared since the last start (a renamed contract is both: its old id's hosts
    /// are not restored, and the new id's targets are dark until read).
    fn record_contracts(&self, ids: &[String]) -> Result<(), StoreError> {
        let stored: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT id FROM contracts ORDER BY id")
                .map_err(|e| self.err(e))?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(|e| self.err(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.err(e))?
        };
        let gone: Vec<&String> = stored.iter().filter(|s| !ids.contains(s)).collect();
        let new: Vec<&String> = ids.iter().filter(|i| !stored.contains(i)).collect();
        if !stored.is_empty() && (!gone.is_empty() || !new.is_empty()) {
            tracing::warn!(
                path = %self.path.display(),
                removed = ?gone,
                added = ?new,
                "the configured contracts differ from the ledger's: sealed minutes of removed ids stay in the ledger but are no longer served, their hosts are not restored, and added ids start dark (unreported) until their targets are read; a renamed contract is both"
            );
        }
        if stored.is_empty() || !gone.is_empty() || !new.is_empty() {
            let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
            tx.execute("DELETE FROM contracts", [])
                .map_err(|e| self.err(e))?;
            for id in ids {
                tx.execute("INSERT OR IGNORE INTO contracts (id) VALUES (?1)", [id])
                    .map_err(|e| self.err(e))?;
            }
            tx.commit().map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Writes newly sealed minutes, the open minutes and the late sums, atomically and
    /// durably (`Ok`: on disk). The hosts' checkpoints go with it when due (every
    /// `--storage.host-checkpoint-interval`), and then only the rows that changed.
    /// A sealed minute written again with the same figures (a retry after an error that
    /// hid a successful commit) is accepted; with other figures it fails the commit.
    pub fn commit(
        &mut self,
        ids: &[String],
        sealed: &[Sealed],
        snap: &Snapshot,
    ) -> Result<(), StoreError> {
        self.commit_with_gaps(ids, sealed, snap, &[])
    }

    /// [`Store::commit`], writing the ledger's pending delivery gaps
    /// ([`crate::ledger::Ledger::pending_gaps`]) in the same transaction: once it returns
    /// `Ok`, pass the mark to [`crate::ledger::Ledger::gaps_persisted`].
    pub fn commit_with_gaps(
        &mut self,
        ids: &[String],
        sealed: &[Sealed],
        snap: &Snapshot,
        gaps: &[Gap],
    ) -> Result<(), StoreError> {
        self.commit_with(
            ids,
            &Commit {
                sealed: sealed.to_vec(),
                snap: snap.clone(),
                gaps: gaps.to_vec(),
                late: Vec::new(),
                hosts: true,
            },
        )
    }

    /// Writes a [`Commit`] of the books: [`Store::commit`], with the pending delivery gaps
    /// and the late GPU-ms by minute ([`crate::ledger::Ledger::pending_late`]) in the same
    /// transaction. Late GPU-ms are kept as one row per contract, minute and commit
    /// (`commit_seq`): a retry of a commit whose success was hidden by an error carries the
    /// same sequence number and replaces that row instead of adding it twice.
    pub fn commit_with(&mut self, ids: &[String], commit: &Commit) -> Result<(), StoreError> {
        let (sealed, snap, gaps) = (&commit.sealed, &commit.snap, &commit.gaps);
        let due = commit.hosts && self.hosts_due();
        let seq = self.seq + 1;
        let path = self.path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let figures = kind_columns(str::to_string);
            let mut ins = tx
                .prepare_cached(&format!(
                    "INSERT INTO minutes (contract, minute, {figures}, allocated)
                     VALUES (?1, ?2, {}) ON CONFLICT (contract, minute) DO NOTHING",
                    (3..4 + Kind::COUNT)
                        .map(|i| format!("?{i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .map_err(sql)?;
            for s in sealed {
                let t = &s.totals;
                let values = t.values();
                let mut row: Vec<&dyn rusqlite::ToSql> = vec![&ids[s.contract], &s.minute];
                row.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
                row.push(&s.allocated);
                let n = ins.execute(&*row).map_err(sql)?;
                if n == 0 {
                    let stored = tx
                        .query_row(
                            &format!(
                                "SELECT {figures}, allocated FROM minutes WHERE contract = ?1 AND minute = ?2"
                            ),
                            params![ids[s.contract], s.minute],
                            |r| Ok((row_totals(r)?, r.get::<_, i64>(Kind::COUNT)?)),
                        )
                        .map_err(sql)?;
                    if stored != (*t, s.allocated) {
                        return Err(StoreError::Inconsistent {
                            path: path.clone(),
                            contract: ids[s.contract].clone(),
                            minute: s.minute,
                            at: jiff::Timestamp::from_second(s.minute.saturating_mul(60))
                                .map(|t| t.to_string())
                                .unwrap_or_default(),
                            reason: "sealed again with other figures than those stored".into(),
                        });
                    }
                }
            }
            // A sealed minute's team rows: written once, with the minute (a retry writes
            // the same rows, which the minute's own check has already compared), and added
            // to the all-time `team_totals` only when new, so a retry adds nothing.
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO team_minutes (contract, minute, team, allocated_ms, used_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (contract, minute, team) DO NOTHING",
                )
                .map_err(sql)?;
            let mut add = tx
                .prepare_cached(
                    "INSERT INTO team_totals (contract, team, allocated_ms, used_ms)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (contract, team) DO UPDATE SET
                         allocated_ms = allocated_ms + excluded.allocated_ms,
                         used_ms = used_ms + excluded.used_ms",
                )
                .map_err(sql)?;
            for s in sealed {
                for (team, a, u) in &s.teams {
                    if ins
                        .execute(params![ids[s.contract], s.minute, team, a, u])
                        .map_err(sql)?
                        == 1
                    {
                        add.execute(params![ids[s.contract], team, a, u])
                            .map_err(sql)?;
                    }
                }
            }
            tx.execute("DELETE FROM open_minutes", []).map_err(sql)?;
            let mut ins = tx
                .prepare_cached("INSERT INTO open_minutes (contract, minute, delivered, used, reported, expected, held, allocated) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")
                .map_err(sql)?;
            for (minute, c, o) in &snap.open {
                ins.execute(params![
                    ids[*c],
                    minute,
                    o.delivered,
                    o.used,
                    o.reported,
                    o.expected,
                    o.held,
                    o.allocated
                ])
                .map_err(sql)?;
            }
            tx.execute("DELETE FROM open_teams", []).map_err(sql)?;
            let mut ins = tx
                .prepare_cached("INSERT INTO open_teams (contract, minute, team, allocated_ms, used_ms) VALUES (?1, ?2, ?3, ?4, ?5)")
                .map_err(sql)?;
            for (minute, c, team, a, u) in &snap.open_teams {
                ins.execute(params![ids[*c], minute, team, a, u])
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
            write_gaps(&tx, ids, gaps).map_err(sql)?;
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO late_minutes (contract, minute, commit_seq, delivered, used)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sql)?;
            for l in commit.late.iter().filter(|l| l.contract < ids.len()) {
                ins.execute(params![ids[l.contract], l.minute, seq, l.delivered, l.used])
                    .map_err(sql)?;
            }
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('sealed_through', ?1), ('since', ?2), ('commit_seq', ?3)",
                params![snap.sealed_through, snap.since, seq],
            )
            .map_err(sql)?;
        }
        let hosts = if due {
            Some(write_hosts(
                &tx,
                &path,
                self.written.as_ref(),
                ids,
                &snap.hosts,
                seq,
            )?)
        } else {
            None
        };
        tx.commit().map_err(sql)?;
        self.seq = seq;
        self.last = CommitStats::default();
        match hosts {
            Some((written, stats)) => {
                self.written = Some(written);
                self.hosts_written_at = Some(clock::monotonic_now());
                self.unwritten = None;
                self.last = stats;
            }
            None if commit.hosts => self.unwritten = Some((ids.to_vec(), snap.hosts.clone())),
            None => {}
        }
        self.checkpoint_wal();
        self.serve_backup_request();
        Ok(())
    }

    /// Whether a host checkpoint is due (`--storage.host-checkpoint-interval` since the
    /// last, or none yet): the next commit writes the hosts' states it carries.
    pub fn hosts_due(&self) -> bool {
        let interval = self.opts.host_checkpoint_interval;
        interval.is_zero()
            || self
                .hosts_written_at
                .is_none_or(|t| clock::elapsed(t) >= interval)
    }

    /// What the last successful commit wrote.
    pub fn last_commit(&self) -> CommitStats {
        self.last
    }

    /// Writes the hosts' checkpoints of the last commit if they were not written with
    /// it: at a clean stop, so a restart resumes every host from its counters.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        let Some((ids, hosts)) = self.unwritten.take() else {
            return Ok(());
        };
        let path = self.path.clone();
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        let (written, stats) =
            write_hosts(&tx, &path, self.written.as_ref(), &ids, &hosts, self.seq)?;
        tx.commit().map_err(sql)?;
        self.written = Some(written);
        self.hosts_written_at = Some(clock::monotonic_now());
        self.last = stats;
        self.checkpoint_wal();
        tracing::info!(
            hosts = hosts.len(),
            rows_written = stats.host_rows_written,
            "host checkpoints written at stop"
        );
        Ok(())
    }

    /// Answers `commitmeter ledger backup` (a request file in the directory): runs
    /// between commits, on the thread that writes the ledger.
    fn serve_backup_request(&mut self) {
        let request = self.dir.join(BACKUP_REQUEST);
        let Ok(text) = std::fs::read_to_string(&request) else {
            return;
        };
        let _ = std::fs::remove_file(&request);
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.to_string()))
        };
        let (Some(id), Some(output)) = (field("id="), field("output=")) else {
            tracing::warn!(path = %request.display(), "ignored a malformed backup request");
            return;
        };
        let output = PathBuf::from(output);
        let started = clock::monotonic_now();
        let answer = match backup_into(&self.conn, &output) {
            Ok(bytes) => {
                tracing::info!(output = %output.display(), bytes, ms = clock::elapsed(started).as_millis() as u64, "ledger backed up");
                format!("id={id}\nok={bytes}\n")
            }
            Err(e) => {
                tracing::warn!(output = %output.display(), error = %e, "ledger backup failed");
                format!("id={id}\nerror={e}\n")
            }
        };
        let tmp = self.dir.join(format!("{BACKUP_DONE}.tmp"));
        if let Err(e) = std::fs::write(&tmp, answer)
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(BACKUP_DONE)))
        {
            tracing::warn!(error = %e, "cannot answer a backup request");
        }
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
                &format!(
                    "SELECT {} FROM minutes WHERE contract = ?1 AND minute >= ?2 AND minute < ?3",
                    kind_columns(|c| format!("COALESCE(SUM({c}),0)"))
                ),
                params![contract, from_minute, to_minute],
                row_totals,
            )
            .map_err(|e| self.err(e))
    }

    /// A contract's sealed team time `[from, to)`: `(team, allocated, used)` GPU-ms per
    /// team with any rows, sorted by team. Teams no longer configured keep their rows.
    /// Summed here in minute order (a `GROUP BY team` sorts every row first: several times
    /// slower on a month of 50 teams).
    pub fn team_sums(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT team, allocated_ms, used_ms FROM team_minutes
                 WHERE contract = ?1 AND minute >= ?2 AND minute < ?3",
            )
            .map_err(|e| self.err(e))?;
        let mut rows = stmt
            .query(params![contract, from_minute, to_minute])
            .map_err(|e| self.err(e))?;
        let mut sums: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let team = r.get_ref(0).map_err(|e| self.err(e))?;
            let team = team.as_str().map_err(|e| self.err(e.into()))?;
            let (a, u): (i64, i64) = (
                r.get(1).map_err(|e| self.err(e))?,
                r.get(2).map_err(|e| self.err(e))?,
            );
            match sums.get_mut(team) {
                Some(s) => *s = (s.0.saturating_add(a), s.1.saturating_add(u)),
                None => {
                    sums.insert(team.to_string(), (a, u));
                }
            }
        }
        Ok(sums.into_iter().map(|(t, (a, u))| (t, a, u)).collect())
    }

    /// A contract's sealed team time over all its minutes, from the running sums kept
    /// with every commit (`team_totals`): what [`Store::team_sums`] gives for all minutes,
    /// without reading them.
    pub fn team_all_time(&self, contract: &str) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT team, allocated_ms, used_ms FROM team_totals
                 WHERE contract = ?1 AND (allocated_ms != 0 OR used_ms != 0) ORDER BY team",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![contract], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Delivery gaps of contract `ids[contract]` that overlap `[from_ms, to_ms)`, open ones
    /// included, in order of start, then target and GPU.
    pub fn gaps(
        &self,
        ids: &[String],
        contract: usize,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Gap>, StoreError> {
        gaps_from(&self.conn, &ids[contract], contract, from_ms, to_ms).map_err(|e| self.err(e))
    }

    /// The delivery gaps of the contracts in `ids` that
    /// [`crate::ledger::Ledger::restore_gaps`] takes back after a restart: the open ones,
    /// and the closed ones that ended at or after `closed_from_ms`
    /// ([`crate::ledger::Ledger::restore_gaps_from`]; `None`: none). One scan of the table,
    /// at start only.
    pub fn gaps_to_restore(
        &self,
        ids: &[String],
        closed_from_ms: Option<i64>,
    ) -> Result<Vec<Gap>, StoreError> {
        let mut out = Vec::new();
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {GAP_COLUMNS} FROM gaps WHERE contract = ?1
                 AND (end_ms IS NULL OR end_ms >= ?2) ORDER BY start_ms, target, gpu"
            ))
            .map_err(|e| self.err(e))?;
        let from = closed_from_ms.unwrap_or(i64::MAX);
        for (c, id) in ids.iter().enumerate() {
            let rows = stmt
                .query_map(params![id, from], |r| gap_row(r, c))
                .map_err(|e| self.err(e))?;
            for g in rows {
                out.push(g.map_err(|e| self.err(e))?);
            }
        }
        Ok(out)
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
            .prepare_cached(&format!(
                "SELECT {}, minute FROM minutes
                 WHERE contract = ?1 AND minute >= ?2 AND minute < ?3 ORDER BY minute",
                kind_columns(str::to_string)
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![contract, from_minute, to_minute], |r| {
                Ok((r.get(Kind::COUNT)?, row_totals(r)?))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// A contract's late GPU-ms `(minute, delivered, used)` for the minutes `[from, to)`,
    /// summed over the commits that added to each minute, in order.
    pub fn late_minutes(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Vec<(i64, i64, i64)>, StoreError> {
        late_minutes_from(&self.conn, contract, from_minute, to_minute).map_err(|e| self.err(e))
    }
}

/// See [`Store::late_minutes`]; also read by [`read_minutes`].
fn late_minutes_from(
    conn: &Connection,
    contract: &str,
    from_minute: i64,
    to_minute: i64,
) -> rusqlite::Result<Vec<(i64, i64, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT minute, sum(delivered), sum(used) FROM late_minutes
         WHERE contract = ?1 AND minute >= ?2 AND minute < ?3 GROUP BY minute ORDER BY minute",
    )?;
    let rows = stmt.query_map(params![contract, from_minute, to_minute], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    rows.collect()
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "cannot write host checkpoints at stop; the next start re-baselines every host");
        }
    }
}

fn row_hash(state: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    state.hash(&mut h);
    h.finish()
}

type Written = HashMap<(String, String), u64>;

/// Writes the host rows that differ from `written` (all of them when `None`) and deletes
/// the ones gone; marks them as the checkpoint of commit `seq`.
fn write_hosts(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    written: Option<&Written>,
    ids: &[String],
    hosts: &[(String, usize, HostState)],
    seq: i64,
) -> Result<(Written, CommitStats), StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let mut stats = CommitStats {
        hosts_checkpointed: true,
        ..CommitStats::default()
    };
    let mut now: Written = HashMap::with_capacity(hosts.len());
    if written.is_none() {
        stats.host_rows_deleted = tx.execute("DELETE FROM hosts", []).map_err(sql)?;
    }
    {
        let mut up = tx
            .prepare_cached(
                "INSERT INTO hosts (target, contract, state) VALUES (?1, ?2, ?3)
                 ON CONFLICT (target, contract) DO UPDATE SET state = excluded.state",
            )
            .map_err(sql)?;
        for (target, c, h) in hosts {
            let json = serde_json::to_string(h).expect("host state serializes");
            let key = (target.clone(), ids[*c].clone());
            let hash = row_hash(&json);
            if written.and_then(|w| w.get(&key)) != Some(&hash) {
                up.execute(params![target, ids[*c], json]).map_err(sql)?;
                stats.host_rows_written += 1;
            }
            now.insert(key, hash);
        }
    }
    if let Some(w) = written {
        let mut del = tx
            .prepare_cached("DELETE FROM hosts WHERE target = ?1 AND contract = ?2")
            .map_err(sql)?;
        for key in w.keys().filter(|k| !now.contains_key(*k)) {
            stats.host_rows_deleted += del.execute(params![key.0, key.1]).map_err(sql)?;
        }
    }
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('hosts_seq', ?1)",
        [seq],
    )
    .map_err(sql)?;
    Ok((now, stats))
}

/// `VACUUM INTO` a temporary file beside `output`, fsynced, then renamed: a backup is
/// either whole or absent. Returns its size.
/// The `gaps` columns [`gap_row`] reads, in order.
const GAP_COLUMNS: &str = "start_ms, target, gpu, end_ms, cause, short_gpu_ms, xids";

/// Delivery gaps of contract `id` (index `contract`) overlapping `[from_ms, to_ms)`, open
/// ones included, in order of start, then target and GPU.
fn gaps_from(
    conn: &Connection,
    id: &str,
    contract: usize,
    from_ms: i64,
    to_ms: i64,
) -> rusqlite::Result<Vec<Gap>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {GAP_COLUMNS} FROM gaps WHERE contract = ?1 AND start_ms < ?3
         AND (end_ms IS NULL OR end_ms > ?2) ORDER BY start_ms, target, gpu"
    ))?;
    let rows = stmt.query_map(params![id, from_ms, to_ms], |r| gap_row(r, contract))?;
    rows.collect()
}

/// One `gaps` row (selected as [`GAP_COLUMNS`]) of contract `contract`. An unknown cause
/// is a ledger written by something else: refused like any value of the wrong type.
fn gap_row(r: &rusqlite::Row<'_>, contract: usize) -> rusqlite::Result<Gap> {
    let cause: String = r.get(4)?;
    let cause = Cause::parse(&cause).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            4,
            rusqlite::types::Type::Text,
            format!("unknown gap cause {cause:?}").into(),
        )
    })?;
    let xids: String = r.get(6)?;
    Ok(Gap {
        contract,
        start_ms: r.get(0)?,
        target: r.get(1)?,
        gpu: r.get(2)?,
        end_ms: r.get(3)?,
        cause,
        short_gpu_ms: r.get(5)?,
        xids: xids
            .split(',')
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// Writes delivery gaps (open, or closed since the last write) within a commit's
/// transaction. A gap is keyed by contract, start, target and GPU: written again as it
/// grows or closes, a row is updated only when it changed, so an open gap costs no write
/// per commit.
pub fn write_gaps(
    tx: &rusqlite::Transaction<'_>,
    ids: &[String],
    gaps: &[Gap],
) -> rusqlite::Result<()> {
    let mut ins = tx.prepare_cached(
        "INSERT INTO gaps (contract, start_ms, target, gpu, end_ms, cause, short_gpu_ms, xids)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (contract, start_ms, target, gpu) DO UPDATE SET
             end_ms = excluded.end_ms, cause = excluded.cause,
             short_gpu_ms = excluded.short_gpu_ms, xids = excluded.xids
         WHERE end_ms IS NOT excluded.end_ms OR cause IS NOT excluded.cause
             OR short_gpu_ms IS NOT excluded.short_gpu_ms OR xids IS NOT excluded.xids",
    )?;
    for g in gaps.iter().filter(|g| g.contract < ids.len()) {
        let xids = g.xids.iter().cloned().collect::<Vec<_>>().join(",");
        ins.execute(params![
            ids[g.contract],
            g.start_ms,
            g.target,
            g.gpu,
            g.end_ms,
            g.cause.as_str(),
            g.short_gpu_ms,
            xids
        ])?;
    }
    Ok(())
}

fn backup_into(conn: &Connection, output: &Path) -> Result<u64, StoreError> {
    let err = |reason: String| StoreError::Backup {
        output: output.to_path_buf(),
        reason,
    };
    if output.exists() {
        return Err(err("the file exists; choose a new name".into()));
    }
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
    }
    let tmp = output.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    conn.execute("VACUUM INTO ?1", [tmp.to_string_lossy()])
        .map_err(|e| err(e.to_string()))?;
    let finish = || -> std::io::Result<u64> {
        let f = File::open(&tmp)?;
        f.sync_all()?;
        let len = f.metadata()?.len();
        std::fs::rename(&tmp, output)?;
        if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        Ok(len)
    };
    finish().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e.to_string())
    })
}

/// `commitmeter ledger backup`: a consistent copy of the ledger in `dir` at `output`.
/// A stopped ledger is copied here (under its lock); a running aggregator or demo is
/// asked to write it between two commits (a request file it checks after each commit),
/// so the copy never waits on or blocks its writer for longer than the copy itself.
/// Returns what was done, for the operator.
pub fn backup(dir: &Path, output: &Path, timeout: Duration) -> Result<String, StoreError> {
    let output = if output.is_absolute() {
        output.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(output))
            .unwrap_or_else(|_| output.to_path_buf())
    };
    let err = |reason: String| StoreError::Backup {
        output: output.clone(),
        reason,
    };
    if output.exists() {
        return Err(err("the file exists; choose a new name".into()));
    }
    if !dir.join(DB_FILE).exists() {
        return Err(err(format!("no ledger at {}", dir.join(DB_FILE).display())));
    }
    match DirLock::acquire(dir, Role::Backup) {
        Ok(_lock) => {
            let path = dir.join(DB_FILE);
            let Found::Ledger(id) = inspect(&path)? else {
                return Err(err(format!(
                    "{} is not a commitmeter ledger with an identity; start the aggregator on it once to see why",
                    path.display()
                )));
            };
            let conn = sqlite_conn(&path).map_err(|source| StoreError::Sqlite {
                path: path.clone(),
                source,
            })?;
            let bytes = backup_into(&conn, &output)?;
            Ok(format!(
                "ledger {} backed up to {} ({bytes} bytes; the ledger was not running)",
                id.id_str(),
                output.display()
            ))
        }
        Err(StoreError::Locked { holder, .. }) => {
            let request_id = Identity::new(Role::Backup).id_str();
            let done = dir.join(BACKUP_DONE);
            let _ = std::fs::remove_file(&done);
            let tmp = dir.join(format!("{BACKUP_REQUEST}.tmp"));
            let request = dir.join(BACKUP_REQUEST);
            std::fs::write(
                &tmp,
                format!("id={request_id}\noutput={}\n", output.display()),
            )
            .and_then(|()| std::fs::rename(&tmp, &request))
            .map_err(|e| {
                err(format!(
                    "cannot write the request {} for the running commitmeter ({holder}): {e}; run this as the user the service runs as",
                    request.display()
                ))
            })?;
            let deadline = clock::monotonic_now() + timeout;
            loop {
                if let Ok(text) = std::fs::read_to_string(&done) {
                    if text.contains(&format!("id={request_id}\n")) {
                        let _ = std::fs::remove_file(&done);
                        if let Some(bytes) = text.lines().find_map(|l| l.strip_prefix("ok=")) {
                            return Ok(format!(
                                "ledger backed up to {} ({bytes} bytes) by the running commitmeter ({holder})",
                                output.display()
                            ));
                        }
                        let why = text
                            .lines()
                            .find_map(|l| l.strip_prefix("error="))
                            .unwrap_or("no reason given");
                        return Err(err(format!("the running commitmeter failed: {why}")));
                    }
                }
                if clock::monotonic_now() >= deadline {
                    let _ = std::fs::remove_file(&request);
                    return Err(err(format!(
                        "the running commitmeter ({holder}) did not answer within {timeout:?}; it writes a backup after its next ledger commit (every scrape interval): is it failing to write its ledger? (see its log and commitmeter_store_errors_total)"
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Err(e) => Err(e),
    }
}

/// One contract's sealed minutes and what the ledger says about them, as read by
/// [`read_minutes`] (`commitmeter statement`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MinutesRead {
    /// The first minute the ledger accounts; `None` before it sealed any.
    pub since_minute: Option<i64>,
    /// The first minute not yet sealed.
    pub sealed_through_minute: Option<i64>,
    /// GPU-ms `(minute, delivered, used)` that arrived after their minutes were sealed,
    /// for the minutes in `[from, to)` that have any; none in a ledger from before the
    /// `late_minutes` table (schema version 5).
    pub late: Vec<(i64, i64, i64)>,
    /// Sealed minutes in `[from, to)`, in order.
    pub minutes: Vec<(i64, Totals)>,
    /// The contract's delivery gaps overlapping those minutes, open ones included (as of the
    /// last commit); none in a ledger from before the gaps table (schema version 4).
    pub gaps: Vec<Gap>,
}

/// Reads `contract`'s sealed minutes `[from_minute, to_minute)` from the ledger in `dir`,
/// writing nothing to the ledger. A stopped ledger is read under its directory lock (so no
/// aggregator starts mid-read); a running aggregator or demo is never blocked: it is asked for
/// a consistent copy between two commits, as `ledger backup` does (into `dir`, removed after
/// reading), and the copy is read.
pub fn read_minutes(
    dir: &Path,
    contract: &str,
    from_minute: i64,
    to_minute: i64,
    timeout: Duration,
) -> Result<MinutesRead, StoreError> {
    let path = dir.join(DB_FILE);
    if !path.is_file() {
        return Err(StoreError::Kind {
            dir: dir.to_path_buf(),
            reason: format!("no ledger here ({} is missing)", path.display()),
        });
    }
    let read = |db: &Path| -> Result<MinutesRead, StoreError> {
        let Found::Ledger(_) = inspect(db)? else {
            return Err(StoreError::Kind {
                dir: dir.to_path_buf(),
                reason: format!("{} is not a commitmeter ledger", path.display()),
            });
        };
        let conn = sqlite_conn(db).map_err(|source| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?;
        read_minutes_from(&conn, &path, contract, from_minute, to_minute)
    };
    match DirLock::acquire(dir, Role::Statement) {
        Ok(_lock) => read(&path),
        Err(StoreError::Locked { .. }) => {
            let copy = dir.join(format!(
                "statement-{}.sqlite3",
                Identity::new(Role::Statement).id_str()
            ));
            let result = backup(dir, &copy, timeout).and_then(|_| read(&copy));
            let _ = std::fs::remove_file(&copy);
            result
        }
        Err(e) => Err(e),
    }
}

fn read_minutes_from(
    conn: &Connection,
    path: &Path,
    contract: &str,
    from_minute: i64,
    to_minute: i64,
) -> Result<MinutesRead, StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    if let Some(found) = meta_value(conn, "schema_version").map_err(sql)? {
        if found > SCHEMA_VERSION {
            return Err(StoreError::Newer {
                path: path.to_path_buf(),
                found,
            });
        }
    }
    let sealed_through_minute = meta_value(conn, "sealed_through").map_err(sql)?;
    let since_minute = meta_value(conn, "since")
        .map_err(sql)?
        .or(sealed_through_minute);
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {}, minute FROM minutes
             WHERE contract = ?1 AND minute >= ?2 AND minute < ?3 ORDER BY minute",
            kind_columns(str::to_string)
        ))
        .map_err(sql)?;
    let minutes = stmt
        .query_map(params![contract, from_minute, to_minute], |r| {
            Ok((r.get(Kind::COUNT)?, row_totals(r)?))
        })
        .map_err(sql)?
        .collect::<Result<_, _>>()
        .map_err(sql)?;
    let has_table = |name: &str| -> Result<bool, StoreError> {
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [name],
            |r| r.get(0),
        )
        .map_err(sql)
    };
    let late = if has_table("late_minutes")? {
        late_minutes_from(conn, contract, from_minute, to_minute).map_err(sql)?
    } else {
        Vec::new()
    };
    let gaps = if has_table("gaps")? {
        gaps_from(
            conn,
            contract,
            0,
            from_minute.saturating_mul(MINUTE_MS),
            to_minute.saturating_mul(MINUTE_MS),
        )
        .map_err(sql)?
    } else {
        Vec::new()
    };
    Ok(MinutesRead {
        since_minute,
        sealed_through_minute,
        late,
        minutes,
        gaps,
    })
}

/// The `minutes` table's figure columns, one per kind in the order of [`Kind::ALL`] (the
/// column names are the kinds' names), each as `expr` writes it, comma-separated: the
/// `SELECT` list that [`row_totals`] reads.
fn kind_columns(expr: impl Fn(&str) -> String) -> String {
    Kind::ALL.map(|k| expr(k.name())).join(", ")
}

/// The figures of a row whose first columns are [`kind_columns`].
fn row_totals(r: &rusqlite::Row<'_>) -> rusqlite::Result<Totals> {
    let mut t = Totals::default();
    for (i, k) in Kind::ALL.into_iter().enumerate() {
        t[k] = r.get(i)?;
    }
    Ok(t)
}

// The tests open the database themselves to see what is on disk.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::ledger::{split, GpuCounters, Ledger, Reading};

    /// A path for a ledger directory (not created) inside a temporary directory that is
    /// removed when the guard drops, also when the test panics.
    fn scratch(tag: &str) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("commitmeter-store-{tag}-"))
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("ledger");
        (tmp, dir)
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
                    ..Default::default()
                },
            )]
            .into(),
            owners: Default::default(),
        }
    }

    #[test]
    fn gaps_are_written_with_a_commit_read_by_period_restored_and_rewritten_with_late_xids() {
        let (_tmp, dir) = scratch("gaps");
        let ids = vec!["a".to_string()];
        let mut ledger = Ledger::new(1, 0);
        let mut store = Store::open(&dir).unwrap();
        // Seals through `t`, commits with the pending gaps; returns them.
        let commit = |store: &mut Store, ledger: &mut Ledger, t: i64| -> Vec<Gap> {
            let sealed = ledger.seal(t, 0, |_, a, b| b - a);
            let (gaps, mark) = ledger.pending_gaps();
            store
                .commit_with_gaps(&ids, &sealed, &ledger.snapshot(), &gaps)
                .unwrap();
            ledger.gaps_persisted(mark);
            gaps
        };
        ledger.observe("h:1", 0, reading(60_000, 0));
        // The GPU stalls between 60 s and 120 s: one gpu_lost gap, open.
        ledger.observe("h:1", 0, reading(120_000, 0));
        ledger.unreachable("h:2", 0); // never seen: nothing
        let gaps = commit(&mut store, &mut ledger, 120_000);
        assert_eq!(gaps.len(), 1);
        assert_eq!(store.gaps_to_restore(&ids, None).unwrap(), gaps);
        // It returns: the gap closes at the reading that starts the first full interval.
        ledger.observe("h:1", 0, reading(180_000, 60_000));
        commit(&mut store, &mut ledger, 180_000);
        assert_eq!(ledger.pending_gaps().0, vec![]);
        let got = store.gaps(&ids, 0, 0, 200_000).unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].start_ms, got[0].end_ms), (60_000, Some(120_000)));
        assert_eq!(got[0].cause, Cause::GpuLost);
        assert!(store.gaps_to_restore(&ids, None).unwrap().is_empty());
        // For a restart whose hosts' readings go back to its end, the closed one too.
        assert_eq!(store.gaps_to_restore(&ids, Some(120_000)).unwrap(), got);
        assert_eq!(store.gaps_to_restore(&ids, Some(120_001)).unwrap(), vec![]);
        // An XID the agent exports a round late: the persisted gap's row takes it with the
        // next commit (and its minutes).
        let xid =
            crate::ledger::Xids::from([("GPU-1".to_string(), [("79".to_string(), 1)].into())]);
        ledger.observe_with_xids("h:1", 0, reading(240_000, 120_000), &xid);
        commit(&mut store, &mut ledger, 240_000);
        let got = store.gaps(&ids, 0, 0, 300_000).unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].start_ms, got[0].end_ms), (60_000, Some(120_000)));
        assert_eq!(got[0].xids, ["79".to_string()].into());
        // By period: a gap overlapping the period's edges only.
        assert_eq!(store.gaps(&ids, 0, 120_000, 200_000).unwrap(), vec![]);
        assert_eq!(store.gaps(&ids, 0, 0, 60_000).unwrap(), vec![]);
        assert_eq!(store.gaps(&ids, 0, 119_999, 120_000).unwrap().len(), 1);
        drop(store);
        let conn = sqlite_conn(&dir.join("ledger.sqlite3")).unwrap();
        assert_eq!(
            meta_value(&conn, "schema_version").unwrap(),
            Some(SCHEMA_VERSION)
        );
    }

    /// The size of a `gaps` row on disk, for the README's estimate: 20,000 closed gaps of
    /// realistic names (a 40-character GPU UUID, a host:port target, two XID codes).
    #[test]
    fn a_gap_row_costs_about_a_hundred_and_fifty_bytes() {
        let (_tmp, dir) = scratch("gapsize");
        let ids = vec!["cluster-a-2026".to_string()];
        let mut store = Store::open(&dir).unwrap();
        let size = |store: &Store| -> i64 {
            let q = |p: &str| store.conn.query_row(p, [], |r| r.get::<_, i64>(0)).unwrap();
            (q("PRAGMA page_count") - q("PRAGMA freelist_count")) * q("PRAGMA page_size")
        };
        let before = size(&store);
        const N: i64 = 20_000;
        let gaps: Vec<Gap> = (0..N)
            .map(|i| Gap {
                contract: 0,
                target: format!("gpu-node-{:05}.dc1.example.com:9473", i % 12_500),
                gpu: format!("GPU-{:08x}-7f3c-1d2e-9a4b-{:012x}", i * 7919, i),
                cause: Cause::GpuLost,
                start_ms: 1_764_547_200_000 + i * 60_000,
                end_ms: Some(1_764_547_200_000 + i * 60_000 + 3_600_000),
                short_gpu_ms: 0,
                xids: ["48".to_string(), "79".to_string()].into(),
            })
            .collect();
        store
            .commit_with_gaps(&ids, &[], &Snapshot::default(), &gaps)
            .unwrap();
        let per_row = (size(&store) - before) / N;
        println!("gaps row: {per_row} bytes on disk");
        assert!(
            (100..=250).contains(&per_row),
            "{per_row} bytes per gap row"
        );
    }

    #[test]
    fn a_commit_round_trips_and_sealed_minutes_never_change() {
        let (_tmp, dir) = scratch("roundtrip");
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
        // What is stored: the ledger's snapshot (its in-memory XID baselines are not).
        assert_eq!(Ledger::restore(2, snap).snapshot(), ledger.snapshot());
        assert_eq!(
            store.sums("b", 0, 10).unwrap(),
            split(60_000, 60_000, 20_000, 0, false)
        );
        assert_eq!(store.minutes("b", 0, 10).unwrap().len(), 1);
        // A sealed minute is written once: a retry with the same figures (a commit whose
        // success was hidden by an error) is accepted, other figures fail the commit.
        let mut store = store;
        store.commit(&ids, &sealed, &ledger.snapshot()).unwrap();
        let mut other = sealed.clone();
        other[1].totals.used += 1;
        other[1].totals.idle -= 1;
        let err = store
            .commit(&ids, &other, &ledger.snapshot())
            .unwrap_err()
            .to_string();
        assert!(err.contains("sealed again with other figures"), "{err}");
        assert_eq!(store.minutes("b", 0, 10).unwrap()[0].1, sealed[1].totals);
    }

    /// The `minutes` table has one column per kind, named and ordered as [`Kind::ALL`]:
    /// a new kind needs its column in `SCHEMA`, a `SCHEMA_VERSION` bump and a migration.
    #[test]
    fn the_minutes_table_has_a_column_per_kind() {
        let (_tmp, dir) = scratch("kind-columns");
        let store = Store::open(&dir).unwrap();
        assert_eq!(minute_columns(&store), minute_columns_wanted());
        drop(store);
    }

    /// The `minutes` table's columns, in order.
    fn minute_columns(store: &Store) -> Vec<String> {
        store
            .conn
            .prepare("SELECT name FROM pragma_table_info('minutes') ORDER BY cid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The key, then one column per kind in `Kind::ALL`'s order, then the contract's
    /// allocated GPU-ms (the team book's total).
    fn minute_columns_wanted() -> Vec<String> {
        ["contract", "minute"]
            .into_iter()
            .chain(Kind::NAMES)
            .chain(["allocated"])
            .map(String::from)
            .collect()
    }

    #[test]
    fn a_version_1_database_is_migrated_and_a_newer_one_refused() {
        let (_tmp, dir) = scratch("migrate");
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
    }

    /// A version 5 ledger (before the idle split): its sealed minutes count all idle as
    /// unallocated, its open minutes have held nothing yet, its host checkpoints (without
    /// the allocated counters) restore as they were, and the columns end in `Kind::ALL`'s
    /// order, as a new ledger's.
    #[test]
    fn a_version_5_database_is_migrated_with_all_earlier_idle_unallocated() {
        let (_tmp, dir) = scratch("migrate-v5");
        drop(Store::open(&dir).unwrap());
        // This version's schema taken back to version 5's, with a version 5 ledger's rows.
        let state = r#"{"added_ms":0,"sized_since_ms":60000,"last":{"at_ms":170000,"agent_ms":170000,"agent_start_ms":0,"sampled_ms":170000,"gpus":{"GPU-1":{"observed_ms":170000,"used_ms":85000}}},"offset_ms":0,"carry":[0,0],"last_restart_ms":null,"retired_until_ms":null}"#;
        Connection::open(dir.join("ledger.sqlite3"))
            .unwrap()
            .execute_batch(&format!(
                "ALTER TABLE minutes DROP COLUMN allocated;
                 ALTER TABLE open_minutes DROP COLUMN allocated;
                 DROP TABLE team_minutes;
                 DROP TABLE open_teams;
                 ALTER TABLE minutes DROP COLUMN idle_unallocated;
                 ALTER TABLE minutes DROP COLUMN idle_allocated;
                 ALTER TABLE open_minutes DROP COLUMN held;
                 UPDATE meta SET value = 5 WHERE key = 'schema_version';
                 INSERT INTO meta VALUES ('sealed_through', 3), ('since', 1);
                 INSERT INTO minutes VALUES ('a', 1, 60000, 60000, 20000, 40000, 0, 0, 0);
                 INSERT INTO minutes VALUES ('a', 2, 60000, 0, 0, 0, 0, 60000, 0);
                 INSERT INTO open_minutes VALUES ('a', 3, 1000, 500, 1000, 1000);
                 INSERT INTO hosts VALUES ('h:1', 'a', '{state}');"
            ))
            .unwrap();
        let store = Store::open(&dir).unwrap();
        let ids = vec!["a".to_string()];
        let snap = store.load(&ids).unwrap().unwrap();
        assert_eq!(snap.open[0].2.held, 0);
        let g = snap.hosts[0].2.last.as_ref().unwrap().gpus["GPU-1"];
        assert_eq!(
            (g.used_ms, g.allocated_ms, g.allocated_used_ms),
            (85_000, None, None)
        );
        let minutes = store.minutes("a", 0, 10).unwrap();
        let split: Vec<(i64, i64, i64)> = minutes
            .iter()
            .map(|(_, t)| (t.idle, t.idle_unallocated, t.idle_allocated))
            .collect();
        assert_eq!(split, vec![(40_000, 40_000, 0), (0, 0, 0)]);
        assert_eq!(
            meta_value(&store.conn, "schema_version").unwrap(),
            Some(SCHEMA_VERSION)
        );
        assert_eq!(minute_columns(&store), minute_columns_wanted());
        drop(store);
        // Opened again: nothing to migrate, nothing changed.
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.minutes("a", 0, 10).unwrap(), minutes);
        drop(store);
    }

    /// A version 6 ledger (before the team book): its sealed and open minutes have no
    /// allocated time (0) and no team rows, so the team series start at the upgrade; its
    /// host checkpoints (without owners) restore as they were, and the first minutes
    /// sealed after it carry their teams.
    #[test]
    fn a_version_6_database_is_migrated_with_no_team_time_before_it() {
        let (_tmp, dir) = scratch("migrate-v6");
        drop(Store::open(&dir).unwrap());
        let state = r#"{"added_ms":0,"sized_since_ms":60000,"last":{"at_ms":170000,"agent_ms":170000,"agent_start_ms":0,"sampled_ms":170000,"gpus":{"GPU-1":{"observed_ms":170000,"used_ms":85000,"allocated_ms":100000,"allocated_used_ms":85000}}},"offset_ms":0,"carry":[0,0],"last_restart_ms":null,"retired_until_ms":null}"#;
        Connection::open(dir.join("ledger.sqlite3"))
            .unwrap()
            .execute_batch(&format!(
                "ALTER TABLE minutes DROP COLUMN allocated;
                 ALTER TABLE open_minutes DROP COLUMN allocated;
                 DROP TABLE team_minutes;
                 DROP TABLE open_teams;
                 UPDATE meta SET value = 6 WHERE key = 'schema_version';
                 INSERT INTO meta VALUES ('sealed_through', 3), ('since', 1);
                 INSERT INTO minutes VALUES ('a', 1, 60000, 60000, 20000, 40000, 0, 0, 0, 40000, 0);
                 INSERT INTO open_minutes VALUES ('a', 3, 1000, 500, 1000, 1000, 0);
                 INSERT INTO hosts VALUES ('h:1', 'a', '{state}');"
            ))
            .unwrap();
        let mut store = Store::open(&dir).unwrap();
        let ids = vec!["a".to_string()];
        let snap = store.load(&ids).unwrap().unwrap();
        assert_eq!(snap.open[0].2.allocated, 0);
        assert!(snap.open_teams.is_empty());
        let last = snap.hosts[0].2.last.as_ref().unwrap();
        assert!(last.owners.is_empty());
        assert_eq!(last.gpus["GPU-1"].allocated_ms, Some(100_000));
        assert_eq!(store.team_sums("a", i64::MIN, i64::MAX).unwrap(), vec![]);
        assert_eq!(minute_columns(&store), minute_columns_wanted());
        assert_eq!(
            meta_value(&store.conn, "schema_version").unwrap(),
            Some(SCHEMA_VERSION)
        );
        // The first minute sealed after the upgrade carries its teams.
        let sealed = [Sealed {
            contract: 0,
            minute: 3,
            totals: split(60_000, 60_000, 30_000, 0, false),
            allocated: 40_000,
            teams: vec![
                ("ml".into(), 30_000, 30_000),
                ("unassigned".into(), 10_000, 0),
            ],
        }];
        let mut snap = snap;
        snap.sealed_through = 4;
        snap.open.clear();
        store.commit(&ids, &sealed, &snap).unwrap();
        assert_eq!(
            store.team_sums("a", i64::MIN, i64::MAX).unwrap(),
            vec![
                ("ml".into(), 30_000, 30_000),
                ("unassigned".into(), 10_000, 0)
            ]
        );
        drop(store);
    }

    /// Open team sums go with the open minutes, a sealed minute's team rows with it, and a
    /// team row that breaks used <= allocated refuses the ledger.
    #[test]
    fn team_rows_round_trip_and_a_bad_one_is_refused() {
        let (_tmp, dir) = scratch("teams");
        let ids = vec!["a".to_string()];
        let mut store = Store::open(&dir).unwrap();
        let snap = Snapshot {
            since: 1,
            sealed_through: 2,
            late: vec![(0, 0)],
            open: vec![(
                2,
                0,
                Open {
                    allocated: 5_000,
                    delivered: 6_000,
                    ..Open::default()
                },
            )],
            open_teams: vec![
                (2, 0, "ml".into(), 4_000, 1_000),
                (2, 0, "unassigned".into(), 1_000, 0),
            ],
            ..Snapshot::default()
        };
        let sealed = [Sealed {
            contract: 0,
            minute: 1,
            totals: split(60_000, 60_000, 30_000, 0, false),
            allocated: 60_000,
            teams: vec![("ml".into(), 60_000, 30_000)],
        }];
        store.commit(&ids, &sealed, &snap).unwrap();
        // A retry with the same figures is accepted; another allocated is not.
        store.commit(&ids, &sealed, &snap).unwrap();
        let mut other = sealed.clone();
        other[0].allocated -= 1;
        assert!(store.commit(&ids, &other, &snap).is_err());
        drop(store);
        let store = Store::open(&dir).unwrap();
        let back = store.load(&ids).unwrap().unwrap();
        assert_eq!(
            (back.open.clone(), back.open_teams.clone()),
            (snap.open, snap.open_teams)
        );
        assert_eq!(
            store.team_sums("a", 0, 2).unwrap(),
            vec![("ml".into(), 60_000, 30_000)]
        );
        // The running all-time sums: the retries added nothing.
        assert_eq!(
            store.team_all_time("a").unwrap(),
            store.team_sums("a", i64::MIN, i64::MAX).unwrap()
        );
        drop(store);
        Connection::open(dir.join("ledger.sqlite3"))
            .unwrap()
            .execute("UPDATE team_totals SET used_ms = allocated_ms + 1", [])
            .unwrap();
        let err = Store::open(&dir)
            .unwrap()
            .load(&ids)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("team ml") && err.contains("used above allocated"),
            "{err}"
        );
    }

    #[test]
    fn an_inconsistent_ledger_refuses_to_start_naming_contract_and_minute() {
        let (_tmp, dir) = scratch("inconsistent");
        let ids = vec!["acme".to_string()];
        let mut store = Store::open(&dir).unwrap();
        let t = split(60_000, 60_000, 30_000, 0, false);
        let sealed = [crate::ledger::Sealed {
            contract: 0,
            minute: 29_333_333,
            totals: t,
            ..Default::default()
        }];
        store
            .commit(&ids, &sealed, &Ledger::new(1, 0).snapshot())
            .unwrap();
        assert!(store.load(&ids).is_ok());
        for (change, reason) in [
            ("idle = -5", "a negative figure"),
            // The idle split must add up to idle.
            (
                "idle_allocated = 1",
                "idle != idle_unallocated + idle_allocated",
            ),
        ] {
            store
                .conn
                .execute(&format!("UPDATE minutes SET {change}"), [])
                .unwrap();
            let err = store.load(&ids).unwrap_err().to_string();
            assert!(
                err.contains("contract \"acme\", minute 29333333 (2025-10-09T")
                    && err.contains(reason),
                "{err}"
            );
            store
                .conn
                .execute(
                    "UPDATE minutes SET idle = 30000, idle_unallocated = 30000, idle_allocated = 0",
                    [],
                )
                .unwrap();
            assert!(store.load(&ids).is_ok());
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_says_the_file_is_not_a_ledger_commitmeter_wrote() {
        let (_tmp, dir) = scratch("real");
        let ids = vec!["acme".to_string()];
        let mut store = Store::open(&dir).unwrap();
        store
            .commit(&ids, &[], &Ledger::new(1, 0).snapshot())
            .unwrap();
        store
            .conn
            .execute("UPDATE late SET delivered = 0.5", [])
            .unwrap();
        let err = store.load(&ids).unwrap_err().to_string();
        assert!(
            err.contains("column \"delivered\" holds a Real value")
                && err.contains("not a ledger commitmeter wrote"),
            "{err}"
        );
    }

    #[test]
    fn a_contract_renamed_between_restarts_is_unreported_until_seen_again() {
        let (_tmp, dir) = scratch("renamed");
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
    }

    fn host_reading(t: i64, gpus: usize, observed_ms: i64) -> Reading {
        Reading {
            received_ms: t,
            agent_ms: Some(t),
            agent_start_ms: Some(0),
            sampled_ms: Some(t),
            gpus: (0..gpus)
                .map(|g| {
                    (
                        format!("GPU-{g}"),
                        GpuCounters {
                            observed_ms,
                            used_ms: observed_ms / 2,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            owners: Default::default(),
        }
    }

    fn opts(interval: Duration) -> StoreOptions {
        StoreOptions {
            host_checkpoint_interval: interval,
            ..StoreOptions::default()
        }
    }

    #[test]
    fn host_checkpoints_write_only_changed_rows_and_only_when_due() {
        let (_tmp, dir) = scratch("incremental");
        let ids = vec!["a".to_string()];
        let mut ledger = Ledger::new(1, 0);
        let hosts: Vec<(String, Vec<usize>)> =
            (0..50).map(|i| (format!("h{i}:1"), vec![0])).collect();
        ledger.configure(0, &hosts, |_, _| i64::MAX);
        for (h, _) in &hosts {
            ledger.observe(h, 0, host_reading(60_000, 8, 0));
        }
        let mut store = Store::open_with(&dir, &opts(Duration::ZERO)).unwrap();
        store.commit(&ids, &[], &ledger.snapshot()).unwrap();
        assert_eq!(store.last_commit().host_rows_written, 50);
        // One host read again: one row written.
        ledger.observe("h7:1", 0, host_reading(75_000, 8, 15_000));
        store.commit(&ids, &[], &ledger.snapshot()).unwrap();
        assert_eq!(
            store.last_commit(),
            CommitStats {
                hosts_checkpointed: true,
                host_rows_written: 1,
                host_rows_deleted: 0
            }
        );
        // Nothing changed: nothing written.
        store.commit(&ids, &[], &ledger.snapshot()).unwrap();
        assert_eq!(store.last_commit().host_rows_written, 0);
        // A host removed from the ledger: its row deleted.
        ledger.configure(80_000, &hosts[1..], |_, _| 0);
        ledger.seal(200_000, 0, |_, _, _| 0);
        store.commit(&ids, &[], &ledger.snapshot()).unwrap();
        assert_eq!(store.last_commit().host_rows_deleted, 1);
        drop(store);

        // With an interval, rounds in between write no host rows; a clean stop does.
        let mut store = Store::open_with(&dir, &opts(Duration::from_secs(3600))).unwrap();
        let snap = store.load(&ids).unwrap().unwrap();
        assert_eq!(snap.hosts.len(), 49);
        let mut ledger = Ledger::restore(1, snap);
        store.commit(&ids, &[], &ledger.snapshot()).unwrap();
        assert!(
            store.last_commit().hosts_checkpointed,
            "first commit of a process"
        );
        for (h, _) in &hosts[1..] {
            ledger.observe(h, 0, host_reading(230_000, 8, 170_000));
        }
        let sealed = ledger.seal(230_000, 0, |_, _, _| 0);
        store.commit(&ids, &sealed, &ledger.snapshot()).unwrap();
        assert_eq!(store.last_commit(), CommitStats::default());
        assert!(!store.hosts_due(), "the next checkpoint is an hour away");
        // A commit that carries no host states (none due) keeps the last ones for the stop.
        let bare = Commit {
            sealed: Vec::new(),
            snap: ledger.snapshot_without_hosts(),
            gaps: Vec::new(),
            late: Vec::new(),
            hosts: false,
        };
        store.commit_with(&ids, &bare).unwrap();
        assert_eq!(store.last_commit(), CommitStats::default());
        assert_eq!(store.unwritten.as_ref().map(|u| u.1.len()), Some(49));
        let stored: i64 = store
            .conn
            .query_row(
                "SELECT count(*) FROM hosts WHERE state LIKE '%170000%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, 0);
        drop(store);
        let store = Store::open(&dir).unwrap();
        let snap = store.load(&ids).unwrap().unwrap();
        assert_eq!(Ledger::restore(1, snap).snapshot(), ledger.snapshot());
        drop(store);
    }

    /// A ledger of contract 0 (2 GPUs committed) and host `h:1` of 2 GPUs, read at 60 s: it
    /// accounts from minute 2.
    fn one_host_of_two_gpus() -> (Ledger, fn(usize, i64, i64) -> i64) {
        let mut ledger = Ledger::new(1, 0);
        ledger.configure(0, &[("h:1".into(), vec![0])], |_, _| i64::MAX);
        ledger.observe("h:1", 0, host_reading(60_000, 2, 0));
        ledger.start_after(60_000);
        (ledger, |_, a, b| (b - a) * 2)
    }

    /// GPU-ms that arrive after their minutes were sealed are kept by minute, add up to the
    /// all-time late sums, and a retried commit (its success hidden by an error) replaces
    /// its own rows rather than adding them twice.
    #[test]
    fn late_gpu_ms_are_kept_by_minute_and_a_retry_adds_nothing() {
        let (_tmp, dir) = scratch("late");
        let ids = vec!["a".to_string()];
        let (mut ledger, committed) = one_host_of_two_gpus();
        let mut store = Store::open(&dir).unwrap();
        let commit = |store: &mut Store, ledger: &mut Ledger, t: i64| {
            let c = Commit {
                sealed: ledger.seal(t, 5_000, committed),
                snap: ledger.snapshot(),
                gaps: Vec::new(),
                late: ledger.pending_late(),
                hosts: true,
            };
            store.commit_with(&ids, &c).unwrap();
            c
        };
        // The ledger accounts from minute 2. The host is silent while minutes 2-3 seal, then
        // reports 240 s of 2 GPUs at once: minute 1's share is before the ledger, minute 4's
        // is on time, minutes 2's and 3's are late.
        commit(&mut store, &mut ledger, 299_000);
        ledger.observe("h:1", 0, host_reading(300_000, 2, 240_000));
        let c = commit(&mut store, &mut ledger, 300_000);
        let per_minute = vec![(2, 120_000, 60_000), (3, 120_000, 60_000)];
        assert_eq!(store.late_minutes("a", 0, 10).unwrap(), per_minute);
        assert_eq!(ledger.late()[0], (240_000, 120_000));
        // The same commit again, as after an error that hid its success.
        store.seq -= 1;
        store.commit_with(&ids, &c).unwrap();
        assert_eq!(store.late_minutes("a", 0, 10).unwrap(), per_minute);
        ledger.late_persisted(&c.late);
        assert!(ledger.pending_late().is_empty());
        commit(&mut store, &mut ledger, 360_000);
        assert_eq!(store.late_minutes("a", 0, 10).unwrap(), per_minute);
        assert_eq!(store.late_minutes("a", 3, 4).unwrap(), per_minute[1..]);
        let all_time: (i64, i64) = store
            .conn
            .query_row(
                "SELECT delivered, used FROM late WHERE contract = 'a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(all_time, ledger.late()[0]);
        drop(store);
        let read = read_minutes(&dir, "a", 3, 10, Duration::from_secs(5)).unwrap();
        assert_eq!(read.late, per_minute[1..]);
    }

    /// A crash between two host checkpoints: the restored hosts re-baseline, so nothing
    /// is counted twice, and the minutes until their next reading are unreported.
    #[test]
    fn a_crash_between_host_checkpoints_counts_nothing_twice() {
        let (_tmp, dir) = scratch("crash");
        let ids = vec!["a".to_string()];
        let (mut ledger, committed) = one_host_of_two_gpus();
        let mut store = Store::open_with(&dir, &opts(Duration::from_secs(3600))).unwrap();
        store.commit(&ids, &[], &ledger.snapshot()).unwrap();
        assert!(store.last_commit().hosts_checkpointed);
        // Rounds every 15 s for 3 minutes, sealing as they go; host rows are not written.
        let mut t = 60_000;
        while t < 240_000 {
            t += 15_000;
            ledger.observe("h:1", 0, host_reading(t, 2, t - 60_000));
            let sealed = ledger.seal(t, 5_000, committed);
            store.commit(&ids, &sealed, &ledger.snapshot()).unwrap();
            assert!(!store.last_commit().hosts_checkpointed);
        }
        // kill -9: nothing more is written.
        store.unwritten = None;
        drop(store);

        let store = Store::open(&dir).unwrap();
        let snap = store.load(&ids).unwrap().unwrap();
        assert!(snap.hosts[0].2.last.is_none(), "stale baseline dropped");
        let mut ledger = Ledger::restore(1, snap);
        let mut store = store;
        // Back 30 s after the crash; the host delivered all along.
        for t in [270_000, 285_000, 300_000, 420_000] {
            ledger.observe("h:1", 0, host_reading(t, 2, t - 60_000));
            let sealed = ledger.seal(t, 5_000, committed);
            store.commit(&ids, &sealed, &ledger.snapshot()).unwrap();
        }
        let all = store.minutes("a", 0, i64::MAX).unwrap();
        assert_eq!(ledger.late()[0], (0, 0), "nothing arrived twice as late");
        for (minute, t) in &all {
            assert!(t.delivered <= 120_000, "minute {minute}: {t:?}");
            assert_eq!(
                t.committed,
                t.used - t.overage + t.idle + t.undelivered + t.unreported
            );
        }
        // Before the crash: full delivery; the crash's minute: short, unreported (the
        // host re-baselined); after the first reading: full again.
        let by: HashMap<i64, Totals> = all.into_iter().collect();
        assert_eq!(by[&2].delivered, 120_000);
        assert_eq!(by[&3].delivered, 120_000);
        assert!(
            by[&4].delivered < 120_000 && by[&4].undelivered == 0 && by[&4].unreported > 0,
            "{:?}",
            by[&4]
        );
        assert_eq!(by[&5].delivered, 120_000);
        drop(store);
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused_naming_the_holder() {
        let (_tmp, dir) = scratch("lock");
        let store = Store::open(&dir).unwrap();
        let err = Store::open(&dir).err().unwrap().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id()))
                && err.contains("role commitmeter aggregator")
                && err.contains(&dir.join(LOCK_FILE).display().to_string()),
            "{err}"
        );
        drop(store);
        assert!(Store::open(&dir).is_ok());
    }

    #[test]
    fn a_store_on_a_directory_a_backup_or_statement_holds_is_refused_naming_it() {
        for (role, name) in [
            (Role::Backup, "ledger backup"),
            (Role::Statement, "statement"),
        ] {
            let (_tmp, dir) = scratch("lock-reader");
            drop(Store::open(&dir).unwrap());
            let lock = DirLock::acquire(&dir, role).unwrap();
            let err = Store::open(&dir).err().unwrap().to_string();
            assert!(
                err.contains(&format!("role commitmeter {name},")),
                "{role:?}: {err}"
            );
            drop(lock);
            assert!(Store::open(&dir).is_ok());
        }
    }

    #[test]
    fn a_lost_or_foreign_ledger_is_refused_and_create_new_moves_it_aside() {
        let (_tmp, dir) = scratch("identity");
        drop(Store::open(&dir).unwrap());
        let db = dir.join(DB_FILE);
        let create = StoreOptions {
            create_new: true,
            ..StoreOptions::default()
        };
        let err = Store::open_with(&dir, &create).err().unwrap().to_string();
        assert!(err.contains("holds a valid ledger"), "{err}");
        std::fs::write(&db, b"").unwrap();
        let err = Store::open(&dir).err().unwrap().to_string();
        assert!(
            err.contains("the file is empty (0 bytes)") && err.contains("--storage.create-new"),
            "{err}"
        );
        std::fs::remove_file(&db).unwrap();
        let err = Store::open(&dir).err().unwrap().to_string();
        assert!(err.contains("the file is missing"), "{err}");
        Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        let err = Store::open(&dir).err().unwrap().to_string();
        assert!(err.contains("another SQLite database"), "{err}");
        drop(Store::open_with(&dir, &create).unwrap());
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("replaced-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert!(
            aside[0].path().join(DB_FILE).exists() && aside[0].path().join(MARKER_FILE).exists()
        );
        assert!(Store::open(&dir).is_ok());
    }

    #[test]
    fn a_ledger_sealed_in_the_future_is_refused_or_its_future_minutes_discarded() {
        let (_tmp, dir) = scratch("future");
        let ids = vec!["a".to_string()];
        let now = 1_000 * MINUTE_MS;
        let mut ledger = Ledger::new(1, now);
        // A clock one day ahead sealed a day of minutes.
        let sealed = ledger.seal(now + 86_400_000, 0, |_, a, b| b - a);
        let mut store = Store::open(&dir).unwrap();
        store.commit(&ids, &sealed, &ledger.snapshot()).unwrap();
        let err = store.check_clock(now).unwrap_err().to_string();
        assert!(
            err.contains(
                "sealed through 1970-01-02T16:40:00Z but the clock says 1970-01-01T16:40:00Z"
            ) && err.contains("--storage.discard-future-minutes"),
            "{err}"
        );
        assert!(store.check_clock(now + 86_400_000).is_ok());
        drop(store);
        let mut store = Store::open_with(
            &dir,
            &StoreOptions {
                discard_future: true,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        store.check_clock(now).unwrap();
        let snap = store.load(&ids).unwrap().unwrap();
        assert_eq!(snap.sealed_through, 1000);
        assert!(store.minutes("a", 1000, i64::MAX).unwrap().is_empty());
        assert!(store.check_clock(now).is_ok());
        drop(store);
    }

    /// A commit that fails midway (here: a conflicting sealed minute after a new one)
    /// leaves nothing of itself; the retry with the same sealed minutes then succeeds.
    #[test]
    fn a_failed_commit_leaves_nothing_and_its_retry_writes_the_same_minutes() {
        let (_tmp, dir) = scratch("rollback");
        let ids = vec!["a".to_string()];
        let t = |used: i64| split(60_000, 60_000, used, 0, false);
        let minute = |m: i64, used: i64| Sealed {
            contract: 0,
            minute: m,
            totals: t(used),
            ..Sealed::default()
        };
        let mut ledger = Ledger::new(1, 0);
        let mut store = Store::open(&dir).unwrap();
        store
            .commit(&ids, &[minute(1, 10)], &ledger.snapshot())
            .unwrap();
        ledger.seal(5 * MINUTE_MS, 0, |_, _, _| 0);
        let err = store.commit(&ids, &[minute(2, 20), minute(1, 11)], &ledger.snapshot());
        assert!(err.is_err());
        assert_eq!(store.minutes("a", 0, 10).unwrap(), vec![(1, t(10))]);
        let through: i64 = meta_value(&store.conn, "sealed_through").unwrap().unwrap();
        assert_eq!(through, 1, "the failed commit's snapshot was not written");
        // The writer retries what is pending: the minute written before and the new one.
        store
            .commit(&ids, &[minute(1, 10), minute(2, 20)], &ledger.snapshot())
            .unwrap();
        assert_eq!(
            store.minutes("a", 0, 10).unwrap(),
            vec![(1, t(10)), (2, t(20))]
        );
        drop(store);
    }
}
