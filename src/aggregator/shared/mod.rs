//! The shared book: one ledger in PostgreSQL for several aggregators (shards, and replicas
//! of each shard). The only module that talks to PostgreSQL (clippy.toml keeps it so).
//!
//! Each aggregator's ledger sees its shard's hosts only, so for each contract and minute it
//! [`contribute`](SharedBook::contribute)s a [`Partial`]: the first write of a
//! (contract, minute, shard) wins, and a replica's or a retry's write of the same key
//! changes nothing. One aggregator at a time [`seal`](SharedBook::seal)s (a transaction-level
//! advisory lock; the others' calls return nothing): per contract, in order, every minute
//! that every shard has contributed to, or whose shard grace has expired (the missing shards'
//! last capacity is then unreported, [`combine`]). Sealed minutes never change: a contribution
//! for one is refused, the primary key keeps a minute from being sealed twice, and a trigger
//! refuses any update or delete of a sealed row.
//!
//! Schema: versioned migrations embedded in the binary (`migrations/*.sql`), applied at
//! [`SharedBook::connect`] in one transaction under an advisory lock, so aggregators starting
//! together migrate once; a database whose schema is newer than the binary's is refused.
//!
//! All-time sums are cheap: `contract_totals` and `team_totals` hold running totals, moved in
//! the seal's transaction ([`SharedBook::all_time`], [`SharedBook::team_all_time`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

use crate::http::tls::{self, TlsError, Trust};
use crate::ledger::shard::{combine, Partial};
use crate::ledger::{Kind, TeamRow, Totals, MINUTE_MS};

/// The schema this binary writes: the last of [`MIGRATIONS`]. A database at a newer version
/// is refused rather than misread.
pub const SCHEMA_VERSION: i32 = 1;

/// Every migration, in order: `(version, SQL)`. Version `n` takes a database from `n - 1`
/// to `n`; each is applied once, in the transaction that records it in `book_schema`.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("migrations/0001_book.sql"))];

/// The advisory lock (per database) held while migrating and claiming the shard count.
const MIGRATE_LOCK: i64 = 0x636d_6d69_6772_0001;
/// The advisory lock (per database) of the sealer: one at a time.
const SEAL_LOCK: i64 = 0x636d_7365_616c_0001;

/// What a missing shard that never contributed for a contract stands for in [`combine`]:
/// nothing known, and any shortfall could be its.
static UNKNOWN_SHARD: Partial = Partial {
    delivered: 0,
    used: 0,
    reported: 0,
    expected: 0,
    absent: 0,
    held: 0,
    allocated: 0,
    watched: false,
    unsized_dark: true,
    capacity_gpus: 0,
    teams: Vec::new(),
};

/// At most this many minutes of one contract are sealed per [`SharedBook::seal`] call (a
/// day), so a sealer catching up after an outage keeps its transactions short; the next call
/// goes on from there.
pub const SEAL_BATCH_MINUTES: i64 = 1440;

/// Connections per aggregator when [`BookOptions::pool_size`] is not set otherwise.
pub const DEFAULT_POOL_SIZE: usize = 4;

/// How long a connection attempt may take when the URL does not say (`connect_timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the shared book and who this aggregator is in it.
#[derive(Clone)]
pub struct BookOptions {
    /// `postgres://user@host:port/database?sslmode=…` (or the `key=value` form). A password
    /// here is used unless `password_file` is given.
    pub url: String,
    /// A file holding the password (one trailing newline is dropped).
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates the server's certificate must chain to; `None`: the system's.
    /// TLS is used as the URL's `sslmode` says (`prefer` by default, `require` to insist).
    pub tls_ca_file: Option<PathBuf>,
    /// How many shards cover the fleet (the `N` of `shard = "i/N"`); the first aggregator
    /// records it in the book and every other must give the same.
    pub shards: u32,
    /// This aggregator's name, recorded with what it writes (contributions, seals).
    pub writer: String,
    /// Connections kept open at most.
    pub pool_size: usize,
}

impl BookOptions {
    /// Options with no password file, the system's CA certificates and
    /// [`DEFAULT_POOL_SIZE`] connections.
    pub fn new(url: impl Into<String>, shards: u32, writer: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password_file: None,
            tls_ca_file: None,
            shards,
            writer: writer.into(),
            pool_size: DEFAULT_POOL_SIZE,
        }
    }
}

impl std::fmt::Debug for BookOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BookOptions")
            .field("url", &redacted(&self.url))
            .field("password_file", &self.password_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("shards", &self.shards)
            .field("writer", &self.writer)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// `url` with any password in it replaced by `***`, for logs and debug output.
pub fn redacted(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                return format!("{scheme}://{}:***{}", &rest[..colon], &rest[at..]);
            }
        }
        return url.to_string();
    }
    // key=value form
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some(("password", _)) => "password=***".to_string(),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What went wrong with the shared book; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    #[error("[storage] postgres: not a PostgreSQL connection URL: {0}")]
    Url(String),
    #[error("[storage] postgres password file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("[storage] postgres password file {0}: empty")]
    EmptyPassword(PathBuf),
    #[error("[storage] postgres TLS CA file: {0}")]
    Tls(#[from] TlsError),
    #[error("shard = \"i/0\": a book needs at least one shard")]
    NoShards,
    #[error("shared book: cannot reach PostgreSQL at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error(
        "shared book: PostgreSQL at {addr}: authentication failed for user {user:?}: {reason}"
    )]
    Auth {
        addr: String,
        user: String,
        reason: String,
    },
    #[error("shared book: database schema v{found} is newer than this commitmeter's v{SCHEMA_VERSION}: upgrade commitmeter")]
    Newer { found: i32 },
    #[error("shard = \"i/{ours}\": the shared book has {theirs} shards (recorded by {by}); every aggregator of one book must give the same shard count")]
    ShardCount { ours: u32, theirs: i64, by: String },
    #[error("shared book: shard {shard} is not one of the book's {shards} (0 to {})", .shards - 1)]
    NoSuchShard { shard: u32, shards: u32 },
    #[error("shared book: PostgreSQL at {addr}: {reason}")]
    Db { addr: String, reason: String },
}

impl BookError {
    /// The database could not be reached or went away: worth retrying with backoff, unlike
    /// a refusal (credentials, schema, shard count), which needs the operator.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, BookError::Unreachable { .. })
    }
}

/// What a [`SharedBook::contribute`] did with its rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contributed {
    /// Rows written: the first for their (contract, minute, shard).
    pub won: usize,
    /// Rows not written because one for the same (contract, minute, shard) was already there
    /// (a replica's or a retry's, or an earlier row of the same call): they change nothing.
    pub already: usize,
    /// Rows refused because their minute is sealed (or behind where the contract's sealing
    /// began): the book's sealed minutes never change.
    pub sealed: usize,
}

/// A sealed minute of one contract, as [`SharedBook::seal`] wrote it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealedRow {
    pub contract: String,
    pub minute: i64,
    pub totals: Totals,
    /// Σ of `teams`' allocated GPU-ms.
    pub allocated: i64,
    /// `(team, allocated, used)` GPU-ms, sorted by team.
    pub teams: Vec<TeamRow>,
    /// The contract's shortfall against its known capacity (`None`: dark).
    pub short: Option<i64>,
    /// Shards that had not contributed by the time their grace expired, with the capacity
    /// (GPUs) each was assumed to hold, counted as unreported; sorted by shard. `None`: the
    /// shard never contributed for the contract, so its capacity is unknown and the minute
    /// is dark (all of its shortfall unreported, `short` unknown).
    pub missing: Vec<(u32, Option<i64>)>,
}

/// A connection pool to one shared book, after its schema and shard count were checked.
pub struct SharedBook {
    pool: Pool,
    shards: u32,
    writer: String,
    /// `host:port` of the server(s), for error messages.
    addr: String,
    /// The user the book connects as, for error messages.
    user: String,
}

impl std::fmt::Debug for SharedBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBook")
            .field("addr", &self.addr)
            .field("shards", &self.shards)
            .field("writer", &self.writer)
            .finish()
    }
}

/// The columns of the ledger kinds, in [`Kind::ALL`] order.
fn kind_columns(prefix: &str) -> String {
    Kind::NAMES
        .iter()
        .map(|k| format!("{prefix}{k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The servers a config names, as `host:port` (a Unix socket as its path).
fn addresses(cfg: &tokio_postgres::Config) -> String {
    let ports = cfg.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| match h {
            Host::Tcp(name) if name.contains(':') => format!("[{name}]:{}", port(i)),
            Host::Tcp(name) => format!("{name}:{}", port(i)),
            Host::Unix(dir) => format!("{}/.s.PGSQL.{}", dir.display(), port(i)),
        })
        .collect();
    if hosts.is_empty() {
        "(no host in the URL)".to_string()
    } else {
        hosts.join(",")
    }
}

/// The server's words for a database error, or the client's with its causes.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let mut out = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        let s = cause.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = cause.source();
    }
    out
}

impl SharedBook {
    /// Connects to the book, applies the migrations it lacks and claims the shard count.
    ///
    /// Refused, with a one-line error naming what to fix: an unreadable or empty password
    /// file, an unreachable server (its `host:port`), wrong credentials ("authentication failed
    /// for user X"), a schema newer than this binary's, a shard count other than the book's.
    pub async fn connect(opts: &BookOptions) -> Result<SharedBook, BookError> {
        if opts.shards == 0 {
            return Err(BookError::NoShards);
        }
        let mut cfg = tokio_postgres::Config::from_str(&opts.url)
            .map_err(|e| BookError::Url(describe(&e)))?;
        if let Some(path) = &opts.password_file {
            let text = std::fs::read_to_string(path).map_err(|source| BookError::PasswordFile {
                path: path.clone(),
                source,
            })?;
            let password = text
                .strip_suffix('\n')
                .map(|p| p.strip_suffix('\r').unwrap_or(p))
                .unwrap_or(&text);
            if password.is_empty() {
                return Err(BookError::EmptyPassword(path.clone()));
            }
            cfg.password(password);
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name(format!("commitmeter {}", opts.writer));
        }
        let trust = match &opts.tls_ca_file {
            Some(path) => Trust::Roots(tls::root_store(path)?),
            None => Trust::Native,
        };
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls::client_config(trust, None)?);
        let addr = addresses(&cfg);
        let user = cfg.get_user().unwrap_or("").to_string();
        // The one place that connects to PostgreSQL (clippy.toml).
        #[allow(clippy::disallowed_methods)]
        let manager = Manager::from_config(
            cfg,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.max(1))
            .build()
            .map_err(|e| BookError::Db {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        let book = SharedBook {
            pool,
            shards: opts.shards,
            writer: opts.writer.clone(),
            addr,
            user,
        };
        let mut client = book.client().await?;
        book.migrate(&mut client).await?;
        tracing::info!(addr = %book.addr, schema = SCHEMA_VERSION, shards = book.shards, writer = %book.writer, "shared book connected");
        Ok(book)
    }

    /// How many shards the book has.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    fn db_reason(&self, reason: String) -> BookError {
        BookError::Db {
            addr: self.addr.clone(),
            reason,
        }
    }

    fn db(&self, e: tokio_postgres::Error) -> BookError {
        if e.as_db_error().is_none()
            && (e.is_closed()
                || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()))
        {
            return BookError::Unreachable {
                addr: self.addr.clone(),
                reason: describe(&e),
            };
        }
        self.db_reason(describe(&e))
    }

    /// A failed connection attempt: wrong credentials, or no server, or the server's refusal.
    fn connect_error(&self, e: &tokio_postgres::Error) -> BookError {
        let auth = |reason: String| BookError::Auth {
            addr: self.addr.clone(),
            user: self.user.clone(),
            reason,
        };
        if let Some(db) = e.as_db_error() {
            if *db.code() == SqlState::INVALID_PASSWORD
                || *db.code() == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            {
                return auth(db.message().to_string());
            }
            return self.db_reason(describe(e));
        }
        let text = describe(e);
        if text.contains("password missing") {
            return auth(
                "the server asks for a password and none was given (password_file)".into(),
            );
        }
        if text.contains("TLS") {
            return self.db_reason(text);
        }
        BookError::Unreachable {
            addr: self.addr.clone(),
            reason: text,
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, BookError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => self.connect_error(&e),
            e => self.db_reason(e.to_string()),
        })
    }

    /// Applies the migrations the database lacks and claims the shard count, in one
    /// transaction under [`MIGRATE_LOCK`].
    async fn migrate(&self, client: &mut deadpool_postgres::Object) -> Result<(), BookError> {
        let tx = client.transaction().await.map_err(|e| self.db(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await
            .map_err(|e| self.db(e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS book_schema (
                 version integer PRIMARY KEY,
                 applied_by text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(|e| self.db(e))?;
        let found: i32 = tx
            .query_one("SELECT COALESCE(max(version), 0) FROM book_schema", &[])
            .await
            .map_err(|e| self.db(e))?
            .get(0);
        if found > SCHEMA_VERSION {
            return Err(BookError::Newer { found });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
            tx.batch_execute(sql).await.map_err(|e| self.db(e))?;
            tx.execute(
                "INSERT INTO book_schema (version, applied_by) VALUES ($1, $2)",
                &[version, &self.writer],
            )
            .await
            .map_err(|e| self.db(e))?;
        }
        if found < SCHEMA_VERSION {
            tracing::info!(addr = %self.addr, from = found, to = SCHEMA_VERSION, "shared book schema migrated");
        }
        let shards = i32::try_from(self.shards).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO book (id, shards, created_by) VALUES (true, $1, $2) ON CONFLICT (id) DO NOTHING",
            &[&shards, &self.writer],
        )
        .await
        .map_err(|e| self.db(e))?;
        let row = tx
            .query_one("SELECT shards, created_by FROM book", &[])
            .await
            .map_err(|e| self.db(e))?;
        let (theirs, by): (i32, String) = (row.get(0), row.get(1));
        if theirs != shards {
            return Err(BookError::ShardCount {
                ours: self.shards,
                theirs: i64::from(theirs),
                by,
            });
        }
        tx.commit().await.map_err(|e| self.db(e))
    }

    /// Writes shard `shard`'s partials `(contract, minute, partial)`, in one transaction:
    /// the first row of a (contract, minute, shard) wins (`INSERT … ON CONFLICT DO NOTHING`),
    /// its team rows are written with it and only with it, and a row for a sealed minute is
    /// refused. Retrying a call, or a replica's call with the same keys, changes nothing.
    ///
    /// A minute is sealed early only when every shard has contributed to it, so a shard
    /// contributes a row for every contract and minute it accounts, zeros (and its
    /// `capacity_gpus`, maybe 0) where it has no targets of the contract; a shard that never
    /// contributed for a contract leaves its minutes dark once their grace expires.
    pub async fn contribute(
        &self,
        shard: u32,
        rows: &[(String, i64, Partial)],
    ) -> Result<Contributed, BookError> {
        if shard >= self.shards {
            return Err(BookError::NoSuchShard {
                shard,
                shards: self.shards,
            });
        }
        let mut out = Contributed::default();
        // The first row of each (contract, minute) in this call, in key order: rows are
        // locked and inserted in one order by every writer, so writers cannot deadlock.
        let mut first: BTreeMap<(&str, i64), &Partial> = BTreeMap::new();
        for (contract, minute, p) in rows {
            match first.entry((contract.as_str(), *minute)) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(p);
                }
                std::collections::btree_map::Entry::Occupied(_) => out.already += 1,
            }
        }
        if first.is_empty() {
            return Ok(out);
        }
        let contracts: Vec<&str> = first
            .keys()
            .map(|(c, _)| *c)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.db(e))?;
        tx.execute(
            "INSERT INTO contract_totals (contract) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            &[&contracts],
        )
        .await
        .map_err(|e| self.db(e))?;
        // FOR SHARE: a seal of these contracts (FOR UPDATE) waits for this transaction, and
        // this one for a seal under way, so a row is never written for a minute being sealed.
        let lines: BTreeMap<String, Option<i64>> = tx
            .query(
                "SELECT contract, seal_from FROM contract_totals WHERE contract = ANY($1)
                 ORDER BY contract FOR SHARE",
                &[&contracts],
            )
            .await
            .map_err(|e| self.db(e))?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut cols = ContributionColumns::default();
        for ((contract, minute), p) in &first {
            if lines
                .get(*contract)
                .copied()
                .flatten()
                .is_some_and(|from| *minute < from)
            {
                out.sealed += 1;
                continue;
            }
            cols.push(contract, *minute, p);
        }
        let shard_i = i32::try_from(shard).unwrap_or(i32::MAX);
        let won: BTreeSet<(String, i64)> = tx
            .query(
                "INSERT INTO contributions (contract, minute, shard, delivered, used, reported,
                     expected, absent, held, allocated, watched, unsized_dark, capacity_gpus,
                     written_by)
                 SELECT c, m, $3, d, u, r, e, a, h, al, w, ud, cap, $14
                 FROM unnest($1::text[], $2::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
                     $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bool[],
                     $12::bool[], $13::bigint[])
                     WITH ORDINALITY AS x(c, m, d, u, r, e, a, h, al, w, ud, cap, n)
                 ORDER BY n
                 ON CONFLICT DO NOTHING
                 RETURNING contract, minute",
                &[
                    &cols.contract,
                    &cols.minute,
                    &shard_i,
                    &cols.delivered,
                    &cols.used,
                    &cols.reported,
                    &cols.expected,
                    &cols.absent,
                    &cols.held,
                    &cols.allocated,
                    &cols.watched,
                    &cols.unsized_dark,
                    &cols.capacity_gpus,
                    &self.writer,
                ],
            )
            .await
            .map_err(|e| self.db(e))?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        out.won = won.len();
        out.already += cols.contract.len() - won.len();
        let mut teams = TeamColumns::default();
        for ((contract, minute), p) in &first {
            if won.contains(&(contract.to_string(), *minute)) {
                for (team, a, u) in &p.teams {
                    teams.push(contract, *minute, team, *a, *u);
                }
            }
        }
        if !teams.contract.is_empty() {
            tx.execute(
                "INSERT INTO contribution_teams (contract, minute, shard, team, allocated, used)
                 SELECT c, m, $3, t, a, u
                 FROM unnest($1::text[], $2::bigint[], $4::text[], $5::bigint[], $6::bigint[])
                     AS x(c, m, t, a, u)",
                &[
                    &teams.contract,
                    &teams.minute,
                    &shard_i,
                    &teams.team,
                    &teams.allocated,
                    &teams.used,
                ],
            )
            .await
            .map_err(|e| self.db(e))?;
        }
        tx.commit().await.map_err(|e| self.db(e))?;
        Ok(out)
    }

    /// Seals what can be sealed of `contracts`, if no other aggregator is sealing (the
    /// transaction-level advisory lock [`SEAL_LOCK`]; `Ok(empty)` when another holds it).
    ///
    /// Per contract, from its first unsealed minute (the first it has a contribution for,
    /// at its first seal: earlier minutes are not accounted), in order, each minute that
    /// every shard has contributed to, or that ended at least `shard_grace_ms` before
    /// `now_ms`: then the shards that did not contribute are *missing* and their last
    /// contributed capacity (GPUs × the minute) counts as expected and not watched
    /// (unreported, [`combine`]). It stops at the first minute that is neither, and after
    /// [`SEAL_BATCH_MINUTES`]. `committed(contract, from_ms, to_ms)` is the contract's
    /// commitment over `[from_ms, to_ms)` in GPU-ms.
    ///
    /// One transaction: the sealed minutes, their teams and missing shards, and the running
    /// totals move together. Returns the minutes sealed, per contract in order.
    pub async fn seal<F>(
        &self,
        contracts: &[String],
        now_ms: i64,
        shard_grace_ms: i64,
        committed: F,
    ) -> Result<Vec<SealedRow>, BookError>
    where
        F: Fn(&str, i64, i64) -> i64,
    {
        let contracts: BTreeSet<&String> = contracts.iter().collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.db(e))?;
        let leased: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&SEAL_LOCK])
            .await
            .map_err(|e| self.db(e))?
            .get(0);
        if !leased {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for contract in contracts {
            let sealed = self
                .seal_contract(&tx, contract, now_ms, shard_grace_ms, &committed)
                .await?;
            out.extend(sealed);
        }
        tx.commit().await.map_err(|e| self.db(e))?;
        if !out.is_empty() {
            tracing::debug!(minutes = out.len(), writer = %self.writer, "shared book: minutes sealed");
        }
        Ok(out)
    }

    async fn seal_contract<F>(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        contract: &str,
        now_ms: i64,
        shard_grace_ms: i64,
        committed: &F,
    ) -> Result<Vec<SealedRow>, BookError>
    where
        F: Fn(&str, i64, i64) -> i64,
    {
        let Some(row) = tx
            .query_opt(
                "SELECT seal_from, shard_capacity FROM contract_totals WHERE contract = $1 FOR UPDATE",
                &[&contract],
            )
            .await
            .map_err(|e| self.db(e))?
        else {
            return Ok(Vec::new());
        };
        let seal_from: Option<i64> = row.get(0);
        // Per shard, its last contributed capacity (GPUs); `None`: it never contributed.
        let mut capacity: Vec<Option<i64>> = row.get(1);
        capacity.resize(self.shards as usize, None);
        let from = match seal_from {
            Some(m) => m,
            None => {
                let first: Option<i64> = tx
                    .query_one(
                        "SELECT min(minute) FROM contributions WHERE contract = $1",
                        &[&contract],
                    )
                    .await
                    .map_err(|e| self.db(e))?
                    .get(0);
                match first {
                    Some(m) => m,
                    None => return Ok(Vec::new()),
                }
            }
        };
        let to = from.saturating_add(SEAL_BATCH_MINUTES);
        // Per minute, the present shards' partials, by shard.
        let mut partials: BTreeMap<i64, BTreeMap<u32, Partial>> = BTreeMap::new();
        for r in tx
            .query(
                "SELECT minute, shard, delivered, used, reported, expected, absent, held,
                     allocated, watched, unsized_dark, capacity_gpus
                 FROM contributions WHERE contract = $1 AND minute >= $2 AND minute < $3",
                &[&contract, &from, &to],
            )
            .await
            .map_err(|e| self.db(e))?
        {
            let shard: i32 = r.get(1);
            let Ok(shard) = u32::try_from(shard) else {
                continue;
            };
            if shard >= self.shards {
                continue;
            }
            partials.entry(r.get(0)).or_default().insert(
                shard,
                Partial {
                    delivered: r.get(2),
                    used: r.get(3),
                    reported: r.get(4),
                    expected: r.get(5),
                    absent: r.get(6),
                    held: r.get(7),
                    allocated: r.get(8),
                    watched: r.get(9),
                    unsized_dark: r.get(10),
                    capacity_gpus: r.get(11),
                    teams: Vec::new(),
                },
            );
        }
        for r in tx
            .query(
                "SELECT minute, shard, team, allocated, used FROM contribution_teams
                 WHERE contract = $1 AND minute >= $2 AND minute < $3
                 ORDER BY minute, shard, team",
                &[&contract, &from, &to],
            )
            .await
            .map_err(|e| self.db(e))?
        {
            let shard: i32 = r.get(1);
            let minute: i64 = r.get(0);
            if let Some(p) = u32::try_from(shard)
                .ok()
                .and_then(|s| partials.get_mut(&minute)?.get_mut(&s))
            {
                p.teams.push((r.get(2), r.get(3), r.get(4)));
            }
        }

        let mut sealed = Vec::new();
        let mut minute = from;
        while minute < to {
            let present = partials.remove(&minute).unwrap_or_default();
            let complete = present.len() == self.shards as usize;
            let end_ms = minute.saturating_add(1).saturating_mul(MINUTE_MS);
            if !complete && now_ms < end_ms.saturating_add(shard_grace_ms) {
                break;
            }
            let missing: Vec<(u32, Option<i64>)> = (0..self.shards)
                .filter(|s| !present.contains_key(s))
                .map(|s| (s, capacity[s as usize]))
                .collect();
            let missing_ms = missing.iter().fold(0i64, |sum, (_, gpus)| {
                sum.saturating_add(gpus.unwrap_or(0).saturating_mul(MINUTE_MS))
            });
            let mut refs: Vec<&Partial> = present.values().collect();
            // A missing shard of unknown capacity: any shortfall could be its (as a target of
            // unknown size that is dark).
            if missing.iter().any(|(_, gpus)| gpus.is_none()) {
                refs.push(&UNKNOWN_SHARD);
            }
            let c = combine(
                committed(contract, minute * MINUTE_MS, end_ms),
                &refs,
                missing_ms,
            );
            for (s, p) in &present {
                capacity[*s as usize] = Some(p.capacity_gpus);
            }
            sealed.push(SealedRow {
                contract: contract.to_string(),
                minute,
                totals: c.totals,
                allocated: c.allocated,
                teams: c.teams,
                short: c.short,
                missing,
            });
            minute += 1;
        }
        if sealed.is_empty() {
            return Ok(sealed);
        }
        self.write_sealed(tx, contract, &sealed, minute, &capacity)
            .await?;
        Ok(sealed)
    }

    /// Writes a contract's newly sealed minutes, their teams and missing shards, and moves
    /// its running totals and where sealing resumes (`next`).
    async fn write_sealed(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        contract: &str,
        sealed: &[SealedRow],
        next: i64,
        capacity: &[Option<i64>],
    ) -> Result<(), BookError> {
        let minutes: Vec<i64> = sealed.iter().map(|s| s.minute).collect();
        let kinds: Vec<Vec<i64>> = Kind::ALL
            .iter()
            .map(|k| sealed.iter().map(|s| s.totals[*k]).collect())
            .collect();
        let allocated: Vec<i64> = sealed.iter().map(|s| s.allocated).collect();
        let short: Vec<Option<i64>> = sealed.iter().map(|s| s.short).collect();
        // $1 contract, $2 writer, $3 minutes, $4.. the kinds, then allocated and short.
        let n = Kind::COUNT;
        let kind_params: Vec<String> = (0..n).map(|i| format!("${}::bigint[]", i + 4)).collect();
        let sql = format!(
            "INSERT INTO sealed_minutes (contract, minute, {cols}, allocated, short, sealed_by)
             SELECT $1, m, {cols}, allocated, short, $2
             FROM unnest($3::bigint[], {kind_params}, ${a}::bigint[], ${s}::bigint[])
                 AS x(m, {cols}, allocated, short)",
            cols = kind_columns(""),
            kind_params = kind_params.join(", "),
            a = n + 4,
            s = n + 5,
        );
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&contract, &self.writer, &minutes];
        for k in &kinds {
            params.push(k);
        }
        params.push(&allocated);
        params.push(&short);
        tx.execute(&sql, &params).await.map_err(|e| self.db(e))?;

        let mut teams = TeamColumns::default();
        let mut team_sums: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        let (mut miss_minute, mut miss_shard, mut miss_gpus) = (Vec::new(), Vec::new(), Vec::new());
        for s in sealed {
            for (team, a, u) in &s.teams {
                teams.push(contract, s.minute, team, *a, *u);
                let sum = team_sums.entry(team).or_default();
                *sum = (sum.0.saturating_add(*a), sum.1.saturating_add(*u));
            }
            for (shard, gpus) in &s.missing {
                miss_minute.push(s.minute);
                miss_shard.push(i32::try_from(*shard).unwrap_or(i32::MAX));
                miss_gpus.push(*gpus);
            }
        }
        if !teams.contract.is_empty() {
            tx.execute(
                "INSERT INTO sealed_teams (contract, minute, team, allocated, used)
                 SELECT $1, m, t, a, u
                 FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::bigint[]) AS x(m, t, a, u)",
                &[&contract, &teams.minute, &teams.team, &teams.allocated, &teams.used],
            )
            .await
            .map_err(|e| self.db(e))?;
            let names: Vec<&str> = team_sums.keys().copied().collect();
            let a: Vec<i64> = team_sums.values().map(|v| v.0).collect();
            let u: Vec<i64> = team_sums.values().map(|v| v.1).collect();
            tx.execute(
                "INSERT INTO team_totals (contract, team, allocated, used)
                 SELECT $1, t, a, u FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS x(t, a, u)
                 ON CONFLICT (contract, team) DO UPDATE
                 SET allocated = team_totals.allocated + EXCLUDED.allocated,
                     used = team_totals.used + EXCLUDED.used",
                &[&contract, &names, &a, &u],
            )
            .await
            .map_err(|e| self.db(e))?;
        }
        if !miss_minute.is_empty() {
            tx.execute(
                "INSERT INTO sealed_missing_shards (contract, minute, shard, capacity_gpus)
                 SELECT $1, m, s, g FROM unnest($2::bigint[], $3::int[], $4::bigint[]) AS x(m, s, g)",
                &[&contract, &miss_minute, &miss_shard, &miss_gpus],
            )
            .await
            .map_err(|e| self.db(e))?;
        }

        let mut sum = Totals::default();
        let mut allocated_sum = 0i64;
        for s in sealed {
            sum.add(&s.totals);
            allocated_sum = allocated_sum.saturating_add(s.allocated);
        }
        let sets: Vec<String> = Kind::NAMES
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} = {k} + ${}", i + 3))
            .collect();
        let sql = format!(
            "UPDATE contract_totals SET seal_from = $2, {sets}, allocated = allocated + ${a},
                 shard_capacity = ${c} WHERE contract = $1",
            sets = sets.join(", "),
            a = n + 3,
            c = n + 4,
        );
        let values = sum.values();
        let capacity = capacity.to_vec();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&contract, &next];
        for v in &values {
            params.push(v);
        }
        params.push(&allocated_sum);
        params.push(&capacity);
        tx.execute(&sql, &params).await.map_err(|e| self.db(e))?;
        Ok(())
    }

    /// The first minute of `contract` the book sealed and the first it has not; `None`:
    /// it has sealed none yet.
    pub async fn accounted(&self, contract: &str) -> Result<Option<(i64, i64)>, BookError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT min(minute), max(minute) FROM sealed_minutes WHERE contract = $1",
                &[&contract],
            )
            .await
            .map_err(|e| self.db(e))?;
        let (first, last): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
        Ok(first.zip(last).map(|(a, b)| (a, b + 1)))
    }

    /// Minutes of `contract` before the returned one are sealed; `None`: none is yet.
    pub async fn sealed_through(&self, contract: &str) -> Result<Option<i64>, BookError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT seal_from FROM contract_totals WHERE contract = $1",
                &[&contract],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// A contract's sealed minutes `[from, to)`, in order.
    pub async fn minutes(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Vec<(i64, Totals)>, BookError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT minute, {} FROM sealed_minutes
                     WHERE contract = $1 AND minute >= $2 AND minute < $3 ORDER BY minute",
                    kind_columns("")
                ),
                &[&contract, &from_minute, &to_minute],
            )
            .await
            .map_err(|e| self.db(e))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0).map_err(|e| self.db(e))?, self.totals(r, 1)?)))
            .collect()
    }

    /// A contract's sealed minutes `[from, to)` in full (teams, short, missing shards), in
    /// order: what [`SharedBook::seal`] returned for them.
    pub async fn sealed(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Vec<SealedRow>, BookError> {
        let client = self.client().await?;
        let range: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&contract, &from_minute, &to_minute];
        let rows = client
            .query(
                &format!(
                    "SELECT minute, allocated, short, {} FROM sealed_minutes
                     WHERE contract = $1 AND minute >= $2 AND minute < $3 ORDER BY minute",
                    kind_columns("")
                ),
                &range,
            )
            .await
            .map_err(|e| self.db(e))?;
        let mut out: BTreeMap<i64, SealedRow> = BTreeMap::new();
        for r in &rows {
            let minute: i64 = r.get(0);
            out.insert(
                minute,
                SealedRow {
                    contract: contract.to_string(),
                    minute,
                    allocated: r.get(1),
                    short: r.get(2),
                    totals: self.totals(r, 3)?,
                    teams: Vec::new(),
                    missing: Vec::new(),
                },
            );
        }
        for r in client
            .query(
                "SELECT minute, team, allocated, used FROM sealed_teams
                 WHERE contract = $1 AND minute >= $2 AND minute < $3 ORDER BY minute, team",
                &range,
            )
            .await
            .map_err(|e| self.db(e))?
        {
            if let Some(s) = out.get_mut(&r.get::<_, i64>(0)) {
                s.teams.push((r.get(1), r.get(2), r.get(3)));
            }
        }
        for r in client
            .query(
                "SELECT minute, shard, capacity_gpus FROM sealed_missing_shards
                 WHERE contract = $1 AND minute >= $2 AND minute < $3 ORDER BY minute, shard",
                &range,
            )
            .await
            .map_err(|e| self.db(e))?
        {
            if let Some(s) = out.get_mut(&r.get::<_, i64>(0)) {
                let shard: i32 = r.get(1);
                s.missing
                    .push((u32::try_from(shard).unwrap_or(u32::MAX), r.get(2)));
            }
        }
        Ok(out.into_values().collect())
    }

    /// Sums of a contract's sealed minutes `[from, to)` (saturating at `i64::MAX`).
    pub async fn sums(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Totals, BookError> {
        let client = self.client().await?;
        let cols: Vec<String> = Kind::NAMES
            .iter()
            .map(|k| format!("LEAST(COALESCE(sum({k}), 0), 9223372036854775807)::bigint"))
            .collect();
        let row = client
            .query_one(
                &format!(
                    "SELECT {} FROM sealed_minutes
                     WHERE contract = $1 AND minute >= $2 AND minute < $3",
                    cols.join(", ")
                ),
                &[&contract, &from_minute, &to_minute],
            )
            .await
            .map_err(|e| self.db(e))?;
        self.totals(&row, 0)
    }

    /// A contract's sealed team time `[from, to)`: `(team, allocated, used)` GPU-ms per team,
    /// sorted by team.
    pub async fn team_sums(
        &self,
        contract: &str,
        from_minute: i64,
        to_minute: i64,
    ) -> Result<Vec<TeamRow>, BookError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT team,
                     LEAST(sum(allocated), 9223372036854775807)::bigint,
                     LEAST(sum(used), 9223372036854775807)::bigint
                 FROM sealed_teams WHERE contract = $1 AND minute >= $2 AND minute < $3
                 GROUP BY team ORDER BY team",
                &[&contract, &from_minute, &to_minute],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// The sums of all of a contract's sealed minutes and their allocated GPU-ms, from the
    /// running totals the seal moves (one row read, however long the book).
    pub async fn all_time(&self, contract: &str) -> Result<(Totals, i64), BookError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT allocated, {} FROM contract_totals WHERE contract = $1",
                    kind_columns("")
                ),
                &[&contract],
            )
            .await
            .map_err(|e| self.db(e))?;
        match row {
            Some(r) => Ok((self.totals(&r, 1)?, r.get(0))),
            None => Ok((Totals::default(), 0)),
        }
    }

    /// [`SharedBook::team_sums`] over all of a contract's sealed minutes, from the running
    /// team totals the seal moves.
    pub async fn team_all_time(&self, contract: &str) -> Result<Vec<TeamRow>, BookError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT team, allocated, used FROM team_totals WHERE contract = $1 ORDER BY team",
                &[&contract],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// [`Kind::ALL`]'s columns of `row`, from column `first`.
    fn totals(&self, row: &Row, first: usize) -> Result<Totals, BookError> {
        let mut t = Totals::default();
        for (i, k) in Kind::ALL.into_iter().enumerate() {
            t[k] = row.try_get(first + i).map_err(|e| self.db(e))?;
        }
        Ok(t)
    }
}

/// Contributions as column arrays, for one `INSERT … SELECT FROM unnest(…)`.
#[derive(Default)]
struct ContributionColumns<'a> {
    contract: Vec<&'a str>,
    minute: Vec<i64>,
    delivered: Vec<i64>,
    used: Vec<i64>,
    reported: Vec<i64>,
    expected: Vec<i64>,
    absent: Vec<i64>,
    held: Vec<i64>,
    allocated: Vec<i64>,
    watched: Vec<bool>,
    unsized_dark: Vec<bool>,
    capacity_gpus: Vec<i64>,
}

impl<'a> ContributionColumns<'a> {
    fn push(&mut self, contract: &'a str, minute: i64, p: &Partial) {
        self.contract.push(contract);
        self.minute.push(minute);
        self.delivered.push(p.delivered);
        self.used.push(p.used);
        self.reported.push(p.reported);
        self.expected.push(p.expected);
        self.absent.push(p.absent);
        self.held.push(p.held);
        self.allocated.push(p.allocated);
        self.watched.push(p.watched);
        self.unsized_dark.push(p.unsized_dark);
        self.capacity_gpus.push(p.capacity_gpus);
    }
}

/// Team rows as column arrays.
#[derive(Default)]
struct TeamColumns<'a> {
    contract: Vec<&'a str>,
    minute: Vec<i64>,
    team: Vec<&'a str>,
    allocated: Vec<i64>,
    used: Vec<i64>,
}

impl<'a> TeamColumns<'a> {
    fn push(&mut self, contract: &'a str, minute: i64, team: &'a str, allocated: i64, used: i64) {
        self.contract.push(contract);
        self.minute.push(minute);
        self.team.push(team);
        self.allocated.push(allocated);
        self.used.push(used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps_up_to_the_schema_version() {
        for (i, (v, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*v, i as i32 + 1);
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.0), Some(SCHEMA_VERSION));
    }

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redacted("postgres://book:s3cret@db:5432/book?sslmode=require"),
            "postgres://book:***@db:5432/book?sslmode=require"
        );
        assert_eq!(
            redacted("postgres://book@db/book"),
            "postgres://book@db/book"
        );
        assert_eq!(
            redacted("host=db user=book password=s3cret"),
            "host=db user=book password=***"
        );
        let mut o = BookOptions::new("postgresql://u:pw@h/d", 2, "agg");
        o.pool_size = 1;
        let shown = format!("{o:?}");
        assert!(!shown.contains("pw@"), "{shown}");
    }

    #[test]
    fn addresses_name_host_and_port() {
        let cfg = tokio_postgres::Config::from_str("postgres://u@db.example:6543/book").unwrap();
        assert_eq!(addresses(&cfg), "db.example:6543");
        let cfg = tokio_postgres::Config::from_str("host=10.0.0.1,10.0.0.2 user=u").unwrap();
        assert_eq!(addresses(&cfg), "10.0.0.1:5432,10.0.0.2:5432");
    }
}
