//! The aggregator role: scrape agents → ledger → durable store → contract metrics.
//!
//! This file is the composition root: the error type, `prepare`, and `serve`, which
//! restores the [`books::Books`] from the store and wires the rooms together:
//!
//! | room | what |
//! |---|---|
//! | `books.rs` | the book-keeping state machine (record → seal → commit → durable totals) and the [`books::LedgerStore`] trait |
//! | `writer.rs` | the store's thread and the write after each round, its outcome applied to the books and counters |
//! | `round.rs` | the scrape loop: target refresh, one round of scrapes, each result booked, what a round logs |
//! | `reload.rs` | SIGHUP: the config re-read |
//! | `routes.rs` | the HTTP routes and readiness |
//! | `view.rs` | month-to-date gauges and the status page from the books, the page's renewal sizing |
//! | `scrape.rs`, `parse.rs`, `targets.rs`, `store.rs`, `metrics.rs`, `status.rs` | scraping, the exposition parser, the target set, SQLite, the series, the page's HTML |

mod book;
pub mod books;
mod connections;
pub mod metrics;
pub mod parse;
mod reload;
mod round;
mod routes;
pub mod scrape;
pub mod shared;
pub mod status;
pub mod store;
pub mod targets;
mod view;
mod writer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hyper::body::Bytes;

use crate::clock::Clock;
use crate::contract::{AggregatorConfig, Contract};
use crate::http;
use books::Books;
use metrics::AggregatorMetrics;
use scrape::Scraper;
use store::Store;
use writer::Writer;

#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error(transparent)]
    Config(#[from] crate::contract::ConfigError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// The web config, or a file the aggregator config names (TLS, password).
    #[error(transparent)]
    ConfigFile(#[from] crate::configfile::ConfigError),
    #[error("{path}: scrape TLS: {source}")]
    ScrapeTls {
        path: PathBuf,
        source: http::tls::TlsError,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The shared book refused this aggregator (credentials, schema, shard count) or, with
    /// `--storage.postgres.exit-if-unreachable`, could not be reached.
    #[error(transparent)]
    Book(#[from] shared::BookError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot start the ledger writer thread: {0}")]
    Writer(std::io::Error),
    #[error("reading the ledger at start: {0}")]
    Task(String),
    #[error("cannot start the scrape thread: {0}")]
    ScrapeThread(std::io::Error),
}

/// Options of `commitmeter aggregator`, already validated, with the files they name read.
pub struct Prepared {
    pub config: AggregatorConfig,
    /// Re-read on SIGHUP.
    pub config_file: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// TLS and basic auth of the listener (`--web.config.file`).
    pub web: http::WebConfig,
    /// How agents are reached: the config's scrape settings with their files read.
    pub scrape: scrape::ScrapeClient,
    /// The client side of scraping `https` targets.
    pub scrape_tls: Arc<rustls::ClientConfig>,
    /// How the ledger directory is opened (`--storage.*` flags; the demo's role).
    pub storage: store::StoreOptions,
    /// `--storage.postgres.exit-if-unreachable`.
    pub book_exit_if_unreachable: bool,
}

/// Reads and checks everything the command line names, as [`crate::agent::prepare`] does
/// for the agent: the config file (parsed without I/O), then the files it names, the
/// listen address and the web config. Nothing is bound or opened yet.
pub fn prepare(args: crate::cli::AggregatorArgs) -> Result<Prepared, AggregatorError> {
    let config_file = args.config_file;
    let config = crate::contract::load(&config_file)?;
    let scrape = scrape::ScrapeClient::load(&config_file, &config.scrape)?;
    // Implausible values and contracts no target can count for: logged, not refused.
    let targets = crate::check::targets_report(&config_file, &config);
    for w in config.warnings.iter().chain(&targets.warnings) {
        tracing::warn!(warning = %w, "implausible configuration");
    }
    let listen = http::parse_listen_address(&args.listen_address)?;
    let web = http::WebConfig::from_flag(args.web_config_file.as_deref())?;
    if scrape.tls.insecure_skip_verify {
        tracing::warn!("tls_insecure_skip_verify: agents' certificates are not checked");
    }
    let scrape_tls = scrape::tls_config(&scrape).map_err(|source| AggregatorError::ScrapeTls {
        path: config_file.clone(),
        source,
    })?;
    Ok(Prepared {
        config,
        config_file,
        listen,
        data_dir: args.storage_path,
        web,
        scrape,
        scrape_tls,
        storage: store::StoreOptions {
            role: store::Role::Aggregator,
            create_new: args.storage.create_new,
            discard_future: args.storage.discard_future_minutes,
            host_checkpoint_interval: args.storage.host_checkpoint_interval,
        },
        book_exit_if_unreachable: args.postgres_exit_if_unreachable,
    })
}

/// What the rooms share: the books, the store's thread, the series, the cached page and
/// the targets' health. Each room adds its methods (`impl Shared` in round.rs, writer.rs,
/// view.rs, routes.rs).
struct Shared {
    /// The main runtime: background work started from the scrape thread (writes, the
    /// shared book, renders) runs here, not on the scrape thread's own runtime.
    runtime: tokio::runtime::Handle,
    contracts: Vec<Contract>,
    /// The config the ledger and scraper were built from, to tell what a reload may change.
    config_at_start: AggregatorConfig,
    ids: Vec<String>,
    /// Held only for short, CPU-only work.
    books: Mutex<Books>,
    writer: Writer,
    /// When a failing write was last logged (at most every [`REJECT_LOG_EVERY_MS`]).
    write_failure_logged: Mutex<Option<Instant>>,
    /// A write in flight for longer than this (real time) fails readiness: the disk hangs.
    write_deadline: Duration,
    metrics: AggregatorMetrics,
    clock: Arc<dyn Clock>,
    /// The first scrape round has finished.
    first_round: AtomicBool,
    /// The status page, rendered in the background after each round; `GET /` serves
    /// this copy, so any number of viewers costs one render per round.
    status_page: RwLock<Bytes>,
    rendering: AtomicBool,
    render_again: AtomicBool,
    /// The renewal sizing the page shows, computed off the request path ([`view`]).
    sizing: Mutex<view::SizingCache>,
    /// Statements served over HTTP, by what they were built from ([`routes`]): a crowd
    /// asking for the same statement costs one build per ledger write.
    statements: Mutex<routes::StatementCache>,
    /// Per target key: its contract and whether its last scrape succeeded.
    health: Mutex<HashMap<String, (Option<usize>, bool)>>,
    /// Per target key: when its rejected readings were last logged (at most every
    /// [`REJECT_LOG_EVERY_MS`], so a hostile agent cannot flood the log).
    rejections_logged: Mutex<HashMap<String, i64>>,
    /// `[storage] postgres`: the shared book the minutes are sealed in ([`book`]).
    book: Option<Arc<book::BookSide>>,
}

const REJECT_LOG_EVERY_MS: i64 = 600_000;

pub async fn run(
    p: Prepared,
    clock: Arc<dyn Clock>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AggregatorError> {
    let listener = http::bind(p.listen).await?;
    serve(p, listener, clock, shutdown).await
}

/// Opens the ledger database and reads the books from it, before anything is served.
fn restore(
    data_dir: &std::path::Path,
    options: &store::StoreOptions,
    contracts: &[Contract],
    grace_ms: i64,
    now_ms: i64,
) -> Result<(Store, Books), store::StoreError> {
    let mut store = Store::open_with(data_dir, options)?;
    if options.role == store::Role::Aggregator {
        // The demo's clock is simulated: a reused demo ledger is "in the future" of it.
        store.check_clock(now_ms)?;
    }
    let ids: Vec<String> = contracts.iter().map(|c| c.id.clone()).collect();
    let snap = store.load(&ids)?;
    match &snap {
        Some(snap) => tracing::info!(
            sealed_through = snap.sealed_through * 60,
            hosts = snap.hosts.len(),
            "ledger restored"
        ),
        None => tracing::info!(path = %data_dir.display(), "new ledger"),
    }
    let books = Books::restore(&store, contracts.to_vec(), grace_ms, snap, now_ms)?;
    Ok((store, books))
}

/// How this aggregator is named in a shared book (who wrote a contribution, who sealed):
/// its host name, listen address and shard.
fn writer_name(listen: &SocketAddr, shard: crate::contract::ShardSpec) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{} shard {shard}", listen.port())
}

/// Runs on an already bound listener (the demo binds first to print its URLs).
pub async fn serve(
    p: Prepared,
    listener: tokio::net::TcpListener,
    clock: Arc<dyn Clock>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AggregatorError> {
    let cfg = p.config;
    let ids: Vec<String> = cfg.contracts.iter().map(|c| c.id.clone()).collect();
    let now = clock.now_ms();
    let (store, books) = {
        let (dir, contracts) = (p.data_dir.clone(), cfg.contracts.clone());
        let options = p.storage.clone();
        let grace_ms = cfg.grace.as_millis() as i64;
        tokio::task::spawn_blocking(move || restore(&dir, &options, &contracts, grace_ms, now))
            .await
            .map_err(|e| AggregatorError::Task(e.to_string()))??
    };
    let mut books = books
        .with_clock_tolerance(clock.scale(Duration::from_millis(
            crate::ledger::host::CLOCK_TOLERANCE_MS as u64,
        )))
        .with_teams(cfg.teams.clone());
    let mut metrics = AggregatorMetrics::new()?;
    // A shared book: this shard's minutes are sealed there, with every other shard's, and
    // the counters are restored from it.
    let book = match &cfg.storage.postgres {
        None => None,
        Some(pg) => {
            let shard = cfg.storage.shard;
            let opts = book::options(pg, shard, writer_name(&p.listen, shard));
            let shared_book = book::connect(&opts, p.book_exit_if_unreachable).await?;
            books = books.into_shared();
            let now_minute = crate::ledger::minute_of(clock.now_ms());
            for (c, contract) in cfg.contracts.iter().enumerate() {
                let (period, start) = book::start_of(&shared_book, contract, now_minute).await?;
                books.adopt_shared(c, period, start);
            }
            metrics = metrics.with_book(shard)?;
            if let Some(m) = &metrics.book {
                m.up.set(1);
            }
            Some(Arc::new(book::BookSide::new(
                shared_book,
                shard,
                cfg.grace,
                pg.shard_grace,
            )))
        }
    };
    for (i, c) in cfg.contracts.iter().enumerate() {
        let r = books.running(i);
        metrics.describe(c);
        let period_s = (r.period_end_ms - r.period_start_ms) as f64 / 1000.0;
        for tier in crate::ledger::burn::TIERS {
            if !tier.reachable(period_s, c.target_utilization) {
                tracing::warn!(
                    contract = %c.id,
                    tier = tier.name,
                    threshold = tier.threshold(period_s, c.target_utilization),
                    "underuse burn-rate tier can never fire for this target (threshold above 100% idle); see docs/alerts"
                );
            }
        }
    }
    let writer = Writer::spawn(store, ids.clone()).map_err(AggregatorError::Writer)?;
    let shared = Arc::new(Shared {
        runtime: tokio::runtime::Handle::current(),
        contracts: cfg.contracts.clone(),
        config_at_start: cfg.clone(),
        ids,
        books: Mutex::new(books),
        writer,
        write_failure_logged: Mutex::new(None),
        write_deadline: (cfg.scrape_interval * 3).max(Duration::from_secs(10)),
        metrics,
        clock,
        first_round: AtomicBool::new(false),
        status_page: RwLock::new(Bytes::new()),
        rendering: AtomicBool::new(false),
        render_again: AtomicBool::new(false),
        sizing: Mutex::new(view::SizingCache::default()),
        statements: Mutex::new(routes::StatementCache::default()),
        health: Mutex::new(HashMap::new()),
        rejections_logged: Mutex::new(HashMap::new()),
        book,
    });
    // The restored counters, team counters included: served from the first scrape, never
    // absent until the first commit after a restart.
    shared.publish_durable();
    {
        let books = shared.books.lock().expect("books lock");
        if !books.is_shared() {
            shared.metrics.since.set(books.since() * 60);
        }
        for (i, c) in shared.contracts.iter().enumerate() {
            shared.metrics.teams.set_period(&c.id, books.team_period(i));
        }
    }
    shared.metrics.write_ok.set(1);
    shared.refresh_gauges();
    *shared.status_page.write().expect("status page lock") =
        Bytes::from(status::render(&shared.status_view()));
    // The renewal sizing of the restored ledger, read by the writer thread meanwhile.
    shared.refresh_sizing();

    tracing::info!(
        address = %listener.local_addr().unwrap_or(p.listen),
        tls = p.web.is_tls(),
        basic_auth = p.web.has_auth(),
        "serving /metrics"
    );
    let hup = Arc::new(AtomicBool::new(false));
    reload::spawn_sighup(hup.clone());
    let scraper = Scraper::new(
        cfg.scrape_timeout,
        cfg.scrape_interval,
        cfg.body_limit_bytes,
        p.scrape_tls,
        &p.scrape,
    );
    shared.metrics.reload_ok.set(1);
    // On the ledger's clock, like every timestamp of this exposition (the demo's is
    // simulated): the config was read "now" as the books see it.
    shared.metrics.reload_time.set(shared.clock.now_ms() / 1000);
    let scraping = round::ScrapeThread::start(shared.clone(), cfg, p.config_file, scraper, hup)
        .map_err(AggregatorError::ScrapeThread)?;
    let served = http::ServerMetrics::register(&shared.metrics.registry)?;
    http::serve_with(
        listener,
        routes::handler(shared.clone()),
        p.web,
        served,
        shutdown,
    )
    .await;
    scraping.stop().await;
    shared.final_write().await;
    tracing::info!("shutting down");
    Ok(())
}
