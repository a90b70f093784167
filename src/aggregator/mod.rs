//! The aggregator role: scrape agents → ledger → durable store → contract metrics.

pub mod metrics;
pub mod parse;
pub mod scrape;
pub mod status;
pub mod store;
pub mod targets;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use hyper::StatusCode;

use crate::clock::{self, Clock};
use crate::contract::{AggregatorConfig, Contract, UsageSignal};
use crate::http::{self, Handler};
use crate::ledger::totals::{figures, Running, Terms};
use crate::ledger::{GpuCounters, Ledger, Outcome, Reading, Sealed, Snapshot, Totals, MINUTE_MS};
use metrics::{
    AggregatorMetrics, ContractLabels, OperationLabels, RejectedLabels, TargetContractLabels,
    TargetLabels, TargetReasonLabels, TierLabels,
};
use scrape::{HostReport, ScrapeError, Scraper};
use store::Store;
use targets::Target;

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
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot start the ledger writer thread: {0}")]
    Writer(std::io::Error),
    #[error("reading the ledger at start: {0}")]
    Task(String),
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
    })
}

/// The ledger's in-memory side, behind one lock held only for short, CPU-only work.
struct Books {
    ledger: Ledger,
    running: Vec<Running>,
    /// Per contract, the durable sealed minutes of its current billing period, oldest
    /// first: the status page is built from these and never reads the database.
    minutes: Vec<Vec<(i64, Totals)>>,
    /// Sealed minutes not yet durable: never exported until written.
    pending: Vec<Sealed>,
    /// Minutes before this one are sealed and durable (the ledger's own `sealed_through`
    /// runs ahead by the pending minutes).
    durable_through: i64,
}

/// At most this many days of sealed minutes per contract wait in memory for a disk that
/// cannot be written; past that, minutes stay open in the ledger (sealed once the disk
/// is back), so memory grows by a few hundred bytes per contract and minute, no more.
const MAX_PENDING_DAYS: usize = 7;

/// Whether the ledger database keeps up. Readiness fails while it does not.
#[derive(Default)]
struct Durability {
    /// When the write in flight was handed to the writer thread (real time).
    in_flight_since: Option<Instant>,
    /// The last write failed and none has succeeded since.
    failing: bool,
    /// When a failing write was last logged (at most every [`REJECT_LOG_EVERY_MS`]).
    logged: Option<Instant>,
}

/// The ledger database on a thread of its own: a slow or hung disk stalls this thread
/// only, never the threads that serve `/metrics` and scrape.
struct Writer {
    jobs: std::sync::mpsc::Sender<WriteJob>,
}

type Done = tokio::sync::oneshot::Sender<Result<(), store::StoreError>>;

enum WriteJob {
    /// Sealed minutes and the ledger's snapshot, in one transaction.
    Commit {
        sealed: Vec<Sealed>,
        snap: Snapshot,
        done: Done,
    },
    /// At a clean stop: the host checkpoints not yet written (they are written only every
    /// `--storage.host-checkpoint-interval` while running).
    Flush { done: Done },
}

impl Writer {
    fn spawn(mut store: Store, ids: Vec<String>) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<WriteJob>();
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                for job in queue {
                    match job {
                        WriteJob::Commit { sealed, snap, done } => {
                            let _ = done.send(store.commit(&ids, &sealed, &snap));
                        }
                        WriteJob::Flush { done } => {
                            let _ = done.send(store.flush());
                        }
                    }
                }
            })?;
        Ok(Self { jobs })
    }
}

struct Shared {
    contracts: Vec<Contract>,
    /// The config the ledger and scraper were built from, to tell what a reload may change.
    config_at_start: AggregatorConfig,
    ids: Vec<String>,
    books: Mutex<Books>,
    writer: Writer,
    durability: Mutex<Durability>,
    /// A write in flight for longer than this (real time) fails readiness: the disk hangs.
    write_deadline: Duration,
    metrics: AggregatorMetrics,
    clock: Arc<dyn Clock>,
    grace_ms: i64,
    /// The first scrape round has finished.
    first_round: AtomicBool,
    /// The status page, rendered in the background after each round; `GET /` serves
    /// this copy, so any number of viewers costs one render per round.
    status_page: RwLock<Bytes>,
    rendering: AtomicBool,
    render_again: AtomicBool,
    /// Per target key: its contract and whether its last scrape succeeded.
    health: Mutex<HashMap<String, (Option<usize>, bool)>>,
    /// Per target key: when its rejected readings were last logged (at most every
    /// [`REJECT_LOG_EVERY_MS`], so a hostile agent cannot flood the log).
    rejections_logged: Mutex<HashMap<String, i64>>,
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

/// What the database holds at start, read before anything is served.
struct Restored {
    store: Store,
    ledger: Ledger,
    running: Vec<Running>,
    minutes: Vec<Vec<(i64, Totals)>>,
}

fn restore(
    data_dir: &std::path::Path,
    options: &store::StoreOptions,
    contracts: &[Contract],
    now_ms: i64,
) -> Result<Restored, store::StoreError> {
    let mut store = Store::open_with(data_dir, options)?;
    if options.role == store::Role::Aggregator {
        // The demo's clock is simulated: a reused demo ledger is "in the future" of it.
        store.check_clock(now_ms)?;
    }
    let ids: Vec<String> = contracts.iter().map(|c| c.id.clone()).collect();
    let ledger = match store.load(&ids)? {
        Some(snap) => {
            tracing::info!(
                sealed_through = snap.sealed_through * 60,
                hosts = snap.hosts.len(),
                "ledger restored"
            );
            Ledger::restore(ids.len(), snap)
        }
        None => {
            tracing::info!(path = %data_dir.display(), "new ledger");
            Ledger::new(ids.len(), now_ms)
        }
    };
    let through = ledger.sealed_through();
    let mut running = Vec::new();
    let mut minutes = Vec::new();
    for c in contracts {
        let period = c.billing_period(through * MINUTE_MS);
        let all_time = store.sums(&c.id, i64::MIN, i64::MAX)?;
        let in_period = store.sums(&c.id, period.0.div_euclid(MINUTE_MS), i64::MAX)?;
        let recent = store.minutes(&c.id, through - 1440, through)?;
        let from = period
            .0
            .max(ledger.since() * MINUTE_MS)
            .div_euclid(MINUTE_MS);
        minutes.push(store.minutes(&c.id, from, through)?);
        running.push(Running::new(all_time, period, in_period, recent));
    }
    Ok(Restored {
        store,
        ledger,
        running,
        minutes,
    })
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
    let restored = {
        let (dir, contracts) = (p.data_dir.clone(), cfg.contracts.clone());
        let options = p.storage.clone();
        tokio::task::spawn_blocking(move || restore(&dir, &options, &contracts, now))
            .await
            .map_err(|e| AggregatorError::Task(e.to_string()))??
    };
    let ledger = restored
        .ledger
        .with_clock_tolerance(clock.scale(Duration::from_millis(
            crate::ledger::host::CLOCK_TOLERANCE_MS as u64,
        )));
    let metrics = AggregatorMetrics::new()?;
    for (c, r) in cfg.contracts.iter().zip(&restored.running) {
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
    for (i, c) in cfg.contracts.iter().enumerate() {
        let late = ledger.late().get(i).copied().unwrap_or_default();
        metrics
            .ledger
            .set(&c.id, &restored.running[i].all_time, late);
    }
    let writer = Writer::spawn(restored.store, ids.clone()).map_err(AggregatorError::Writer)?;
    let durable_through = ledger.sealed_through();
    let shared = Arc::new(Shared {
        contracts: cfg.contracts.clone(),
        config_at_start: cfg.clone(),
        ids,
        books: Mutex::new(Books {
            ledger,
            running: restored.running,
            minutes: restored.minutes,
            pending: Vec::new(),
            durable_through,
        }),
        writer,
        durability: Mutex::new(Durability::default()),
        write_deadline: (cfg.scrape_interval * 3).max(Duration::from_secs(10)),
        metrics,
        clock,
        grace_ms: cfg.grace.as_millis() as i64,
        first_round: AtomicBool::new(false),
        status_page: RwLock::new(Bytes::new()),
        rendering: AtomicBool::new(false),
        render_again: AtomicBool::new(false),
        health: Mutex::new(HashMap::new()),
        rejections_logged: Mutex::new(HashMap::new()),
    });
    {
        let books = shared.books.lock().expect("books lock");
        shared.metrics.since.set(books.ledger.since() * 60);
        shared
            .metrics
            .sealed_through
            .set(books.ledger.sealed_through() * 60);
    }
    shared.metrics.write_ok.set(1);
    shared.refresh_gauges();
    *shared.status_page.write().expect("status page lock") =
        Bytes::from(status::render(&shared.status_view()));

    tracing::info!(
        address = %listener.local_addr().unwrap_or(p.listen),
        tls = p.web.is_tls(),
        basic_auth = p.web.has_auth(),
        "serving /metrics"
    );
    let hup = Arc::new(AtomicBool::new(false));
    spawn_sighup(hup.clone());
    let scraper = Scraper::new(
        cfg.scrape_timeout,
        cfg.body_limit_bytes,
        p.scrape_tls,
        &p.scrape,
    );
    shared.metrics.reload_ok.set(1);
    // On the ledger's clock, like every timestamp of this exposition (the demo's is
    // simulated): the config was read "now" as the books see it.
    shared.metrics.reload_time.set(shared.clock.now_ms() / 1000);
    let scraping = tokio::spawn(scrape_loop(
        shared.clone(),
        cfg,
        p.config_file,
        scraper,
        hup,
    ));
    let served = http::ServerMetrics::register(&shared.metrics.registry)?;
    http::serve_with(listener, handler(shared.clone()), p.web, served, shutdown).await;
    scraping.abort();
    let _ = scraping.await;
    shared.final_write().await;
    tracing::info!("shutting down");
    Ok(())
}

/// SIGHUP: re-reads the config file with the same validation as at start. A bad file
/// keeps the running config (error logged, `commitmeter_config_last_reload_successful 0`).
/// Targets, file_sd and how agents are reached (scheme, TLS files, credentials) apply at
/// once: the returned scraper replaces the running one. Contracts and the scrape timing
/// (interval, timeout, grace, body limit) shape the ledger and the scrape loop, so they apply
/// at the next restart (`commitmeter_config_restart_required`).
fn reload(shared: &Shared, cfg: &mut AggregatorConfig, path: &std::path::Path) -> Option<Scraper> {
    let m = &shared.metrics;
    let new = crate::contract::load(path)
        .map_err(|e| e.to_string())
        .and_then(|new| {
            let client =
                scrape::ScrapeClient::load(path, &new.scrape).map_err(|e| e.to_string())?;
            let tls = scrape::tls_config(&client)
                .map_err(|e| format!("{}: scrape TLS: {e}", path.display()))?;
            Ok((new, client, tls))
        });
    let (new, client, tls) = match new {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; keeping the running config");
            m.reload_ok.set(0);
            return None;
        }
    };
    let settings = |c: &AggregatorConfig| {
        format!(
            "{:?}",
            (
                c.scrape_interval,
                c.scrape_timeout,
                c.grace,
                c.body_limit_bytes,
                &c.contracts
            )
        )
    };
    let restart = settings(&new) != settings(&shared.config_at_start);
    if restart {
        tracing::warn!(
            "config reloaded: changes to contracts or scrape timing apply after a restart"
        );
    } else {
        tracing::info!("config reloaded");
    }
    m.restart_required.set(i64::from(restart));
    let scraper = Scraper::new(cfg.scrape_timeout, cfg.body_limit_bytes, tls, &client);
    cfg.static_targets = new.static_targets;
    cfg.file_sd = new.file_sd;
    cfg.scrape = new.scrape;
    m.reload_ok.set(1);
    m.reload_time.set(shared.clock.now_ms() / 1000);
    Some(scraper)
}

fn spawn_sighup(flag: Arc<AtomicBool>) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: re-reading the config file and file_sd targets");
                    flag.store(true, Ordering::Relaxed);
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
    }
}

/// Every route answers from memory: nothing here waits for the disk or a target.
fn handler(shared: Arc<Shared>) -> Handler {
    http::handler(move |path: String| {
        let shared = shared.clone();
        async move { routes(&shared, &path) }
    })
}

fn routes(shared: &Shared, path: &str) -> Option<http::Reply> {
    match path {
        "/metrics" => Some(http::metrics(&shared.metrics.registry)),
        "/-/healthy" => Some(http::text(StatusCode::OK, "text/plain", "OK\n")),
        "/-/ready" => Some(match shared.unready() {
            None => http::text(StatusCode::OK, "text/plain", "OK\n"),
            Some(why) => http::text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
        }),
        "/" => Some(http::text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            shared.status_page.read().expect("status page lock").clone(),
        )),
        _ => None,
    }
}

/// Keeps the target list current: file_sd files re-read when they change or on SIGHUP.
struct TargetSet {
    targets: Arc<Vec<Target>>,
    fingerprint: Vec<(PathBuf, u64, Option<std::time::SystemTime>)>,
    cache: targets::SdCache,
    loaded: bool,
}

impl TargetSet {
    fn refresh(&mut self, shared: &Shared, cfg: &AggregatorConfig, forced: bool) {
        let files = targets::sd_files(&cfg.file_sd);
        let fp = targets::fingerprint(&files);
        if !forced && self.loaded && fp == self.fingerprint {
            return;
        }
        let first = !self.loaded;
        self.loaded = true;
        self.fingerprint = fp;
        let built = targets::build(
            &shared.contracts,
            &cfg.static_targets,
            &files,
            &mut self.cache,
            cfg.scrape.scheme,
        );
        for p in &built.problems {
            tracing::error!(problem = %p, "target configuration");
        }
        let m = &shared.metrics;
        m.targets_problems.set(built.problems.len() as i64);
        tracing::info!(
            targets = built.targets.len(),
            conflicts = built.conflicts.len(),
            first,
            "targets loaded"
        );
        let now: HashMap<String, Option<usize>> = built
            .targets
            .iter()
            .map(|t| (t.key(), t.contract))
            .collect();
        for old in self.targets.iter() {
            let key = old.key();
            let moved = match now.get(&key) {
                Some(c) if *c == old.contract => continue,
                Some(_) => true,
                None => false,
            };
            // Gone, or now another contract's: a series left behind would page forever.
            m.target_up.remove(&TargetContractLabels {
                target: &key,
                contract: contract_label(shared, old),
            });
            if !moved {
                m.target_duration.remove(&TargetLabels { target: &key });
                m.target_gpus.remove(&TargetLabels { target: &key });
                for reason in ScrapeError::REASONS {
                    m.target_errors.remove(&TargetReasonLabels {
                        target: &key,
                        reason,
                    });
                }
                shared.health.lock().expect("health lock").remove(&key);
                shared
                    .rejections_logged
                    .lock()
                    .expect("rejections lock")
                    .remove(&key);
            }
        }
        // The ledger knows every configured target, conflicts included: one it cannot
        // see is unreported capacity, never undelivered.
        let mut configured: Vec<(String, Vec<usize>)> = built
            .targets
            .iter()
            .filter_map(|t| t.contract.map(|c| (t.key(), vec![c])))
            .collect();
        configured.extend(built.conflicts);
        let now_ms = shared.clock.now_ms();
        shared
            .books
            .lock()
            .expect("books lock")
            .ledger
            .configure(now_ms, &configured, |c, t| {
                shared.contracts[c].billing_period(t).1
            });
        self.targets = Arc::new(built.targets);
    }
}

fn contract_label<'a>(shared: &'a Shared, t: &Target) -> &'a str {
    t.contract.map_or("", |c| shared.ids[c].as_str())
}

/// What a target refresh works on: owned by a blocking thread while it reads the config
/// and file_sd files, so a hung file system or a FIFO stalls that thread, not the loop.
struct Refresh {
    set: TargetSet,
    cfg: AggregatorConfig,
    /// A new scraper when SIGHUP changed how agents are reached.
    scraper: Option<Scraper>,
}

/// How long a round waits for a target refresh before scraping the last known targets.
const REFRESH_WAIT: Duration = Duration::from_secs(2);

async fn scrape_loop(
    shared: Arc<Shared>,
    cfg: AggregatorConfig,
    config_file: PathBuf,
    scraper: Scraper,
    hup: Arc<AtomicBool>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let budget = scrape::BodyBudget::for_limit(cfg.body_limit_bytes);
    let mut scraper = scraper.with_budget(budget.clone());
    let mut tick = tokio::time::interval(cfg.scrape_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle = Some(Refresh {
        set: TargetSet {
            targets: Arc::new(Vec::new()),
            fingerprint: Vec::new(),
            cache: targets::SdCache::new(),
            loaded: false,
        },
        cfg,
        scraper: None,
    });
    let mut running: Option<tokio::task::JoinHandle<Refresh>> = None;
    let mut targets: Arc<Vec<Target>> = Arc::new(Vec::new());
    let mut log = RoundLog::default();
    let mut slow_refresh_logged = false;
    loop {
        tick.tick().await;
        if let Some(mut r) = idle.take() {
            let hupped = hup.swap(false, Ordering::Relaxed);
            let (sh, path) = (shared.clone(), config_file.clone());
            running = Some(tokio::task::spawn_blocking(move || {
                if hupped {
                    r.scraper = reload(&sh, &mut r.cfg, &path);
                }
                r.set.refresh(&sh, &r.cfg, hupped);
                r
            }));
        }
        if let Some(job) = running.as_mut() {
            // The first round needs its targets; later ones go on with the last list.
            let wait = if log.rounds == 0 {
                Duration::MAX
            } else {
                REFRESH_WAIT
            };
            match tokio::time::timeout(wait, job).await {
                Ok(Ok(mut r)) => {
                    if let Some(new) = r.scraper.take() {
                        scraper = new.with_budget(budget.clone());
                    }
                    targets = r.set.targets.clone();
                    idle = Some(r);
                    running = None;
                    if slow_refresh_logged {
                        tracing::info!("target refresh finished");
                        slow_refresh_logged = false;
                    }
                }
                Ok(Err(e)) => {
                    // A bug, not a fault of the files: start over from the config at start.
                    tracing::error!(error = %e, "target refresh failed; reloading targets from scratch");
                    idle = Some(Refresh {
                        set: TargetSet {
                            targets: targets.clone(),
                            fingerprint: Vec::new(),
                            cache: targets::SdCache::new(),
                            loaded: false,
                        },
                        cfg: shared.config_at_start.clone(),
                        scraper: None,
                    });
                    running = None;
                }
                Err(_) => {
                    if !slow_refresh_logged {
                        tracing::warn!(
                            "reading the config or file_sd files is taking long (hung file system?); scraping the last known targets meanwhile"
                        );
                        slow_refresh_logged = true;
                    }
                }
            }
        }
        let started = clock::monotonic_now();
        let mut jobs = tokio::task::JoinSet::new();
        for i in 0..targets.len() {
            let (shared, scraper, limit, targets) = (
                shared.clone(),
                scraper.clone(),
                limit.clone(),
                targets.clone(),
            );
            jobs.spawn(async move {
                let _permit = limit.acquire().await;
                let t = &targets[i];
                let started = clock::monotonic_now();
                let result = scraper.scrape(t).await;
                let received_ms = shared.clock.now_ms();
                let took = clock::elapsed(started);
                shared.record(t, received_ms, took, &result);
                (t.key(), result.err().map(|e| (e.reason(), e.to_string())))
            });
        }
        let mut outcomes = Vec::with_capacity(targets.len());
        while let Some(done) = jobs.join_next().await {
            if let Ok(outcome) = done {
                outcomes.push(outcome);
            }
        }
        log.round(outcomes, clock::elapsed(started));
        if !shared.first_round.load(Ordering::Relaxed) {
            let mut books = shared.books.lock().expect("books lock");
            books.ledger.start_after(shared.clock.now_ms());
            shared.metrics.since.set(books.ledger.since() * 60);
        }
        shared.seal_due();
        shared.start_write();
        shared.refresh_gauges();
        shared.first_round.store(true, Ordering::Relaxed);
        shared.render_status();
    }
}

/// What the scrape loop logs: state changes of targets (a few lines per round at most)
/// and a summary of the round when it differs from the last one, or every ten minutes.
/// Never a line per target per round, whatever the fleet does.
#[derive(Default)]
struct RoundLog {
    rounds: u64,
    /// Per target: `None` up, else the reason of its last failure.
    state: HashMap<String, Option<&'static str>>,
    last_summary: Option<(usize, usize, String)>,
    summary_at: Option<Instant>,
}

/// State-change lines per round; the rest are counted in the round's summary.
const STATE_LINES_PER_ROUND: usize = 10;
const SUMMARY_EVERY: Duration = Duration::from_secs(600);

impl RoundLog {
    fn round(&mut self, outcomes: Vec<(String, Option<(&'static str, String)>)>, took: Duration) {
        let first = self.rounds == 0;
        self.rounds += 1;
        let mut lines = 0;
        let mut unlogged = 0;
        let mut changed = 0;
        let mut down_by: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut seen = HashMap::with_capacity(outcomes.len());
        for (key, failure) in outcomes {
            let now = failure.as_ref().map(|(reason, _)| *reason);
            if let Some(reason) = now {
                *down_by.entry(reason).or_default() += 1;
            }
            let before = self.state.get(&key).copied();
            // A target's first scrape is news only when it fails.
            let news = match before {
                None => now.is_some(),
                Some(b) => b != now,
            };
            if news {
                changed += 1;
                if lines < STATE_LINES_PER_ROUND {
                    lines += 1;
                    match &failure {
                        Some((reason, e)) => {
                            tracing::warn!(scrape_target = %key, reason = %reason, error = %e, "scrape failed")
                        }
                        None => tracing::info!(scrape_target = %key, "scrape ok again"),
                    }
                } else {
                    unlogged += 1;
                }
            }
            seen.insert(key, now);
        }
        self.state = seen;
        let down: usize = down_by.values().sum();
        let up = self.state.len() - down;
        let reasons = down_by
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        let summary = (up, down, reasons);
        let due = self
            .summary_at
            .is_none_or(|at| clock::elapsed(at) >= SUMMARY_EVERY);
        if first || changed > 0 || due || self.last_summary.as_ref() != Some(&summary) {
            tracing::info!(
                targets = up + down,
                up,
                down,
                down_by_reason = %summary.2,
                changed,
                changes_not_logged = unlogged,
                took_ms = took.as_millis() as u64,
                "scrape round"
            );
            self.summary_at = Some(clock::monotonic_now());
        } else {
            tracing::debug!(
                targets = up + down,
                up,
                down,
                took_ms = took.as_millis() as u64,
                "scrape round"
            );
        }
        self.last_summary = Some(summary);
    }
}

impl Shared {
    /// Why the aggregator is not ready, if it is not: before the first round, while the
    /// ledger cannot be written, or while a write hangs.
    fn unready(&self) -> Option<String> {
        if !self.first_round.load(Ordering::Relaxed) {
            return Some("first scrape round not finished\n".into());
        }
        let d = self.durability.lock().expect("durability lock");
        if d.failing {
            return Some(
                "the ledger cannot be written (see the log); sealed minutes are kept in memory\n"
                    .into(),
            );
        }
        match d.in_flight_since {
            Some(at) if clock::elapsed(at) > self.write_deadline => Some(format!(
                "a ledger write has not finished for {} s (is the disk hung?)\n",
                clock::elapsed(at).as_secs()
            )),
            _ => None,
        }
    }

    /// Feeds one scrape's result to the ledger and the target series. Returns up.
    fn record(
        &self,
        t: &Target,
        received_ms: i64,
        took: Duration,
        result: &Result<HostReport, ScrapeError>,
    ) -> bool {
        let key = t.key();
        let m = &self.metrics;
        m.target_duration
            .with(&TargetLabels { target: &key })
            .set(took.as_secs_f64());
        let up_series = m.target_up.with(&TargetContractLabels {
            target: &key,
            contract: contract_label(self, t),
        });
        self.health
            .lock()
            .expect("health lock")
            .insert(key.clone(), (t.contract, result.is_ok()));
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                up_series.set(0.0);
                m.target_errors
                    .with(&TargetReasonLabels {
                        target: &key,
                        reason: e.reason(),
                    })
                    .inc();
                return false;
            }
        };
        up_series.set(1.0);
        let Some(c) = t.contract else {
            m.target_gpus
                .with(&TargetLabels { target: &key })
                .set(report.gpus.len() as f64);
            return true;
        };
        let contract = &self.contracts[c];
        let gpus: BTreeMap<String, GpuCounters> = report
            .gpus
            .iter()
            .filter(|(_, g)| contract.model_matches(g.model.as_deref().unwrap_or("")))
            .map(|(uuid, g)| {
                let used = match contract.usage_signal {
                    UsageSignal::Busy => g.busy_ms,
                    UsageSignal::Allocated => g.allocated_ms,
                };
                (
                    uuid.clone(),
                    GpuCounters {
                        observed_ms: g.observed_ms,
                        used_ms: used.unwrap_or(0),
                    },
                )
            })
            .collect();
        m.target_gpus
            .with(&TargetLabels { target: &key })
            .set(gpus.len() as f64);
        let reading = Reading {
            received_ms,
            agent_ms: report.round_ms,
            agent_start_ms: report.start_ms,
            sampled_ms: report.sampled_ms,
            gpus,
        };
        let out = self
            .books
            .lock()
            .expect("books lock")
            .ledger
            .observe(&key, c, reading);
        self.note(&key, c, received_ms, &out);
        true
    }

    /// Counts what the ledger rejected and tells the operator about a target's rejected
    /// readings (at most every ten minutes per target), restarts and far-off clocks.
    fn note(&self, key: &str, c: usize, now_ms: i64, out: &Outcome) {
        let id = &self.ids[c];
        for (why, ms) in &out.rejected {
            self.metrics
                .rejected
                .with(&RejectedLabels {
                    contract: id,
                    reason: why.as_str(),
                })
                .inc_by(*ms as f64 / 1000.0);
        }
        if !out.rejected.is_empty() {
            let mut logged = self.rejections_logged.lock().expect("rejections lock");
            let due = logged
                .get(key)
                .is_none_or(|&last| now_ms - last >= REJECT_LOG_EVERY_MS);
            if due {
                logged.insert(key.to_string(), now_ms);
                let mut by_reason: BTreeMap<&str, i64> = BTreeMap::new();
                for (why, ms) in &out.rejected {
                    *by_reason.entry(why.as_str()).or_default() += ms;
                }
                let reasons: Vec<String> = by_reason
                    .iter()
                    .map(|(why, ms)| format!("{why}={:.3}s", *ms as f64 / 1000.0))
                    .collect();
                tracing::warn!(
                    scrape_target = %key,
                    contract = %id,
                    rejected = %reasons.join(","),
                    "agent readings rejected as physically impossible; booked unreported (see commitmeter_ledger_rejected_gpu_seconds_total)"
                );
            }
        }
        if out.restarted {
            tracing::info!(scrape_target = %key, contract = %id, "agent restarted; its new counters count from its process start");
        }
        if out.reanchored {
            tracing::warn!(
                scrape_target = %key,
                tolerance_ms = self.books.lock().expect("books lock").ledger.clock_tolerance_ms(),
                "agent clock differs from the aggregator's by more than the tolerance; its readings are placed on the aggregator's clock"
            );
        }
    }

    /// Seals the minutes that are due into `pending` (CPU only), unless [`MAX_PENDING_DAYS`]
    /// of them already wait for the disk.
    fn seal_due(&self) {
        let now = self.clock.now_ms();
        let mut books = self.books.lock().expect("books lock");
        if books.pending.len() >= MAX_PENDING_DAYS * 1440 * self.contracts.len().max(1) {
            return;
        }
        let contracts = &self.contracts;
        let newly = books.ledger.seal(now, self.grace_ms, |c, a, b| {
            contracts[c].committed_gpu_ms(a, b)
        });
        books.pending.extend(newly);
        self.metrics.pending.set(books.pending.len() as i64);
    }

    /// Hands the pending minutes and the ledger's snapshot to the writer thread, unless a
    /// write is still in flight (a slow disk: the next write carries everything). The
    /// store writes open minutes every round and host checkpoints when they are due.
    fn start_write(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        {
            let mut d = self.durability.lock().expect("durability lock");
            if d.in_flight_since.is_some() {
                return None;
            }
            d.in_flight_since = Some(clock::monotonic_now());
        }
        let (sealed, snap) = {
            let books = self.books.lock().expect("books lock");
            (books.pending.clone(), books.ledger.snapshot())
        };
        let (n, late, through) = (sealed.len(), snap.late.clone(), snap.sealed_through);
        let (done, outcome) = tokio::sync::oneshot::channel();
        let sent = self
            .writer
            .jobs
            .send(WriteJob::Commit { sealed, snap, done });
        let me = self.clone();
        Some(tokio::spawn(async move {
            let written = match sent {
                Ok(()) => outcome
                    .await
                    .map_err(|_| "the ledger writer thread is gone".to_string())
                    .and_then(|r| r.map_err(|e| e.to_string())),
                Err(_) => Err("the ledger writer thread is gone".to_string()),
            };
            me.finish_write(n, &late, through, written);
        }))
    }

    /// Applies a finished write: only now do its minutes reach the counters.
    fn finish_write(
        self: &Arc<Self>,
        n: usize,
        late: &[(i64, i64)],
        through: i64,
        written: Result<(), String>,
    ) {
        {
            let mut d = self.durability.lock().expect("durability lock");
            d.in_flight_since = None;
            match &written {
                Ok(()) if d.failing => {
                    d.failing = false;
                    d.logged = None;
                    tracing::info!(
                        minutes = n,
                        "the ledger is written again; pending minutes are durable"
                    );
                }
                Ok(()) => {}
                Err(e) => {
                    let due = d.logged.is_none_or(|at| {
                        clock::elapsed(at) >= Duration::from_millis(REJECT_LOG_EVERY_MS as u64)
                    });
                    if due {
                        tracing::error!(error = %e, pending_minutes = n, "cannot write the ledger; sealed minutes kept in memory and retried every round");
                        d.logged = Some(clock::monotonic_now());
                    }
                    d.failing = true;
                }
            }
        }
        if written.is_err() {
            self.metrics.write_ok.set(0);
            self.metrics
                .store_errors
                .with(&OperationLabels {
                    operation: "commit",
                })
                .inc();
            return;
        }
        self.metrics.write_ok.set(1);
        let mut guard = self.books.lock().expect("books lock");
        let books = &mut *guard;
        for s in books.pending.drain(..n) {
            let c = &self.contracts[s.contract];
            let r = &mut books.running[s.contract];
            r.record(&s, |t| c.billing_period(t));
            let minutes = &mut books.minutes[s.contract];
            let start = r.period_start_ms.div_euclid(MINUTE_MS);
            if minutes.first().is_some_and(|(m, _)| *m < start) {
                minutes.retain(|(m, _)| *m >= start);
            }
            if s.minute >= start {
                minutes.push((s.minute, s.totals));
            }
        }
        for (c, contract) in self.contracts.iter().enumerate() {
            let late = late.get(c).copied().unwrap_or_default();
            self.metrics
                .ledger
                .set(&contract.id, &books.running[c].all_time, late);
        }
        books.durable_through = through;
        self.metrics.sealed_through.set(through * 60);
        self.metrics.pending.set(books.pending.len() as i64);
        drop(guard);
        // The month-to-date gauges and the page move with the counters.
        self.refresh_gauges();
        if n > 0 {
            self.render_status();
        }
    }

    /// At shutdown: waits for a write in flight, then writes once more, so a clean stop
    /// leaves the freshest snapshot. A hung disk does not hold the process: after
    /// [`FINAL_WRITE_WAIT`] it stops anyway (open minutes are recovered from the agents'
    /// cumulative counters at the next start).
    async fn final_write(self: &Arc<Self>) {
        let deadline = clock::monotonic_now() + FINAL_WRITE_WAIT;
        loop {
            if self
                .durability
                .lock()
                .expect("durability lock")
                .in_flight_since
                .is_none()
            {
                break;
            }
            if clock::monotonic_now() >= deadline {
                tracing::warn!(
                    "a ledger write did not finish before shutdown; stopping without it"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.seal_due();
        if let Some(job) = self.start_write() {
            let left = deadline.saturating_duration_since(clock::monotonic_now());
            if tokio::time::timeout(left, job).await.is_err() {
                tracing::warn!(
                    "the last ledger write did not finish before shutdown; stopping without it"
                );
                return;
            }
        }
        // Every host's checkpoint, so a restart resumes every host from its counters.
        let (done, flushed) = tokio::sync::oneshot::channel();
        if self.writer.jobs.send(WriteJob::Flush { done }).is_err() {
            return;
        }
        let left = deadline.saturating_duration_since(clock::monotonic_now());
        match tokio::time::timeout(left, flushed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "cannot write host checkpoints at stop; the next start re-baselines every host"),
            _ => tracing::warn!("host checkpoints not written before shutdown; the next start re-baselines every host"),
        }
    }

    /// Renders the status page on a blocking thread, one render at a time; a request for
    /// a render while one runs makes that one run once more.
    fn render_status(self: &Arc<Self>) {
        self.render_again.store(true, Ordering::Release);
        if self.rendering.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || loop {
            me.render_again.store(false, Ordering::Release);
            let html = Bytes::from(status::render(&me.status_view()));
            *me.status_page.write().expect("status page lock") = html;
            me.rendering.store(false, Ordering::Release);
            if !me.render_again.load(Ordering::Acquire) || me.rendering.swap(true, Ordering::AcqRel)
            {
                break;
            }
        });
    }

    /// The inputs of a contract's month-to-date figures. A ledger started mid-period
    /// accounts the period from its own start.
    fn terms(contract: &Contract, r: &Running, since_ms: i64, through_ms: i64) -> Terms {
        let (start, end) = (
            r.period_start_ms.max(since_ms).min(r.period_end_ms),
            r.period_end_ms,
        );
        let from = through_ms.clamp(start, end);
        Terms {
            committed_period: contract.committed_gpu_ms(start, end),
            committed_remaining: contract.committed_gpu_ms(from, end),
            remaining_ms: end - from,
            target_utilization: contract.target_utilization,
            price_per_gpu_hour: contract.price_per_gpu_hour,
        }
    }

    /// Month-to-date gauges from the sealed, durable minutes.
    fn refresh_gauges(&self) {
        let now = self.clock.now_ms();
        let books = self.books.lock().expect("books lock");
        let through_ms = books.durable_through * MINUTE_MS;
        let since_ms = books.ledger.since() * MINUTE_MS;
        for (c, contract) in self.contracts.iter().enumerate() {
            let r = &books.running[c];
            let f = figures(r, &Self::terms(contract, r, since_ms, through_ms));
            self.metrics
                .set_period(contract, r.period_start_ms, r.period_end_ms, &r.period, &f);
            self.metrics
                .committed_gpus
                .with(&ContractLabels {
                    contract: &contract.id,
                })
                .set(contract.committed_gpus_at(now) as f64);
            // Reachability depends on the period's length (28 to 31 days), so it follows
            // the period the figures are in.
            let period_s = (r.period_end_ms - r.period_start_ms) as f64 / 1000.0;
            for tier in crate::ledger::burn::TIERS {
                self.metrics
                    .tier_reachable
                    .with(&TierLabels {
                        contract: &contract.id,
                        tier: tier.name,
                    })
                    .set(f64::from(u8::from(
                        tier.reachable(period_s, contract.target_utilization),
                    )));
            }
        }
    }

    /// What the status page shows: the same figures as the gauges, plus the sealed
    /// minutes of the period for burn rates and the chart, all from memory.
    fn status_view(&self) -> status::View {
        let now_ms = self.clock.now_ms();
        let (since_ms, through_ms, running, minutes) = {
            let books = self.books.lock().expect("books lock");
            (
                books.ledger.since() * MINUTE_MS,
                // Durable minutes only, as the counters: a write in flight is not shown.
                books.durable_through * MINUTE_MS,
                books.running.clone(),
                books.minutes.clone(),
            )
        };
        let health = self.health.lock().expect("health lock").clone();
        let contracts = self
            .contracts
            .iter()
            .zip(running)
            .zip(minutes)
            .enumerate()
            .map(|(i, ((c, r), minutes))| {
                let mine = health.values().filter(|(ci, _)| *ci == Some(i));
                let up = mine.clone().filter(|(_, up)| *up).count();
                status::ContractView {
                    id: c.id.clone(),
                    provider: c.provider.clone(),
                    currency: c.currency.clone(),
                    timezone: c.timezone_name.clone(),
                    target: c.target_utilization,
                    committed_gpus_now: c.committed_gpus_at(now_ms),
                    period: (r.period_start_ms, r.period_end_ms),
                    mtd: r.period,
                    figures: figures(&r, &Self::terms(c, &r, since_ms, through_ms)),
                    minutes,
                    targets_up: up,
                    targets_down: mine.count() - up,
                }
            })
            .collect();
        status::View {
            now_ms,
            since_ms,
            sealed_through_ms: through_ms,
            contracts,
        }
    }
}

/// How long shutdown waits for the last ledger write.
const FINAL_WRITE_WAIT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::split;

    /// Sealed minutes crossing a Los Angeles month end roll the month-to-date figures
    /// at local midnight (07:00 UTC in November, PDT), not at UTC midnight.
    #[test]
    fn month_to_date_rolls_at_local_midnight_across_dst() {
        let text = r#"
[[contracts]]
id = "la"
provider = "p"
price_per_gpu_hour = 1.0
currency = "USD"
timezone = "America/Los_Angeles"
start = "2026-10-01"
selector = '{provider="p"}'
ramp = [ { from = "2026-10-01", gpus = 10 } ]
"#;
        let cfg = crate::contract::parse(std::path::Path::new("t.toml"), text).unwrap();
        let c = &cfg.contracts[0];
        // 2026-11-01T06:00Z is 23:00 PDT on Oct 31; local midnight is 07:00Z.
        let first = 1_793_512_800_000 / MINUTE_MS; // 2026-11-01T06:00:00Z
        let mut r = Running::new(
            Default::default(),
            c.billing_period(first * MINUTE_MS),
            Default::default(),
            vec![],
        );
        assert_eq!(r.period_end_ms, 1_793_516_400_000); // 2026-11-01T07:00:00Z
        for minute in first..first + 120 {
            let (a, b) = (minute * MINUTE_MS, (minute + 1) * MINUTE_MS);
            let s = Sealed {
                contract: 0,
                minute,
                totals: split(c.committed_gpu_ms(a, b), 600_000, 300_000, 0, false),
            };
            r.record(&s, |t| c.billing_period(t));
        }
        // One hour in the new (November) period, two hours all time.
        assert_eq!(r.period_start_ms, 1_793_516_400_000);
        assert_eq!(r.period_end_ms, 1_796_112_000_000); // 2026-12-01T08:00:00Z (PST)
        assert_eq!(r.period.committed, 10 * 3_600_000);
        assert_eq!(r.all_time.committed, 10 * 7_200_000);
        assert_eq!(r.period.used, 60 * 300_000);
    }
}
