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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::StatusCode;

use crate::contract::{AggregatorConfig, Contract, UsageSignal};
use crate::http::{self, Handler};
use crate::ledger::totals::{figures, Running, Terms};
use crate::ledger::{GpuCounters, Ledger, Outcome, Reading, Sealed, MINUTE_MS};
use metrics::AggregatorMetrics;
use scrape::{HostReport, ScrapeError, Scraper};
use store::Store;
use targets::Target;

#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error(transparent)]
    Config(#[from] crate::contract::ConfigError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    WebConfig(#[from] http::WebConfigError),
    #[error("{path}: scrape TLS: {source}")]
    ScrapeTls {
        path: PathBuf,
        source: http::tls::TlsError,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Where time comes from: the system clock in production, a simulated one in the
/// demo. The ledger only ever sees these milliseconds.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;

    /// A real duration in this clock's milliseconds (a simulated clock runs faster), for
    /// the tolerances that are about real delays.
    fn scale(&self, real: Duration) -> i64 {
        real.as_millis() as i64
    }
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// Options of `commitmeter aggregator`, already validated.
pub struct Prepared {
    pub config: AggregatorConfig,
    /// Re-read on SIGHUP.
    pub config_file: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// TLS and basic auth of the listener (`--web.config.file`).
    pub web: http::WebConfig,
    /// The client side of scraping `https` targets.
    pub scrape_tls: Arc<rustls::ClientConfig>,
    /// How the ledger directory is opened (`--storage.*` flags; the demo's role).
    pub storage: store::StoreOptions,
}

pub fn prepare(
    config_file: &std::path::Path,
    listen: &str,
    data_dir: PathBuf,
    web_config_file: Option<&std::path::Path>,
) -> Result<Prepared, AggregatorError> {
    let config = crate::contract::load(config_file)?;
    let listen = http::parse_listen_address(listen)?;
    let web = http::WebConfig::from_flag(web_config_file)?;
    if config.scrape.tls.insecure_skip_verify {
        tracing::warn!("tls_insecure_skip_verify: agents' certificates are not checked");
    }
    let scrape_tls =
        scrape::tls_config(&config.scrape).map_err(|source| AggregatorError::ScrapeTls {
            path: config_file.to_path_buf(),
            source,
        })?;
    Ok(Prepared {
        config,
        config_file: config_file.to_path_buf(),
        listen,
        data_dir,
        web,
        scrape_tls,
        storage: store::StoreOptions::default(),
    })
}

/// The ledger's in-memory side, behind one lock held only for short, CPU-only work.
struct Books {
    ledger: Ledger,
    running: Vec<Running>,
    /// Sealed minutes not yet durable: never exported until written.
    pending: Vec<Sealed>,
}

struct Shared {
    contracts: Vec<Contract>,
    /// The config the ledger and scraper were built from, to tell what a reload may change.
    config_at_start: AggregatorConfig,
    ids: Vec<String>,
    books: Mutex<Books>,
    store: Mutex<Store>,
    metrics: AggregatorMetrics,
    clock: Arc<dyn Clock>,
    grace_ms: i64,
    ready: AtomicBool,
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

/// Runs on an already bound listener (the demo binds first to print its URLs).
pub async fn serve(
    p: Prepared,
    listener: tokio::net::TcpListener,
    clock: Arc<dyn Clock>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AggregatorError> {
    let cfg = p.config;
    let mut store = Store::open_with(&p.data_dir, &p.storage)?;
    if p.storage.role == store::Role::Aggregator {
        // The demo's clock is simulated: a reused demo ledger is "in the future" of it.
        store.check_clock(clock.now_ms())?;
    }
    let ids: Vec<String> = cfg.contracts.iter().map(|c| c.id.clone()).collect();
    let now = clock.now_ms();
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
            tracing::info!(path = %p.data_dir.display(), "new ledger");
            Ledger::new(ids.len(), now)
        }
    }
    .with_clock_tolerance(clock.scale(Duration::from_millis(
        crate::ledger::host::CLOCK_TOLERANCE_MS as u64,
    )));
    let metrics = AggregatorMetrics::new()?;
    let through_ms = ledger.sealed_through() * MINUTE_MS;
    let mut running = Vec::new();
    for c in &cfg.contracts {
        let period = c.billing_period(through_ms);
        let all_time = store.sums(&c.id, i64::MIN, i64::MAX)?;
        let in_period = store.sums(&c.id, period.0.div_euclid(MINUTE_MS), i64::MAX)?;
        let recent = store.minutes(
            &c.id,
            ledger.sealed_through() - 1440,
            ledger.sealed_through(),
        )?;
        metrics.describe(c);
        let period_s = (period.1 - period.0) as f64 / 1000.0;
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
        let late = ledger
            .late()
            .get(running.len())
            .copied()
            .unwrap_or_default();
        metrics.ledger.set(&c.id, &all_time, late);
        running.push(Running::new(all_time, period, in_period, recent));
    }
    let shared = Arc::new(Shared {
        contracts: cfg.contracts.clone(),
        config_at_start: cfg.clone(),
        ids,
        books: Mutex::new(Books {
            ledger,
            running,
            pending: Vec::new(),
        }),
        store: Mutex::new(store),
        metrics,
        clock,
        grace_ms: cfg.grace.as_millis() as i64,
        ready: AtomicBool::new(false),
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
    shared.refresh_gauges();

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
        &cfg.scrape,
    );
    shared.metrics.reload_ok.set(1);
    shared.metrics.reload_time.set(SystemClock.now_ms() / 1000);
    let scraping = tokio::spawn(scrape_loop(
        shared.clone(),
        cfg,
        p.config_file,
        scraper,
        hup,
    ));
    http::serve_with(listener, handler(shared.clone()), p.web, shutdown).await;
    scraping.abort();
    let _ = scraping.await;
    // A clean stop leaves the freshest snapshot and every host's checkpoint behind (they
    // are written only hourly while running), so a restart resumes every host exactly.
    shared.seal_and_commit().await;
    if let Err(e) = shared.store.lock().expect("store lock").flush() {
        tracing::warn!(error = %e, "cannot write host checkpoints at stop; the next start re-baselines every host");
    }
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
            let tls = scrape::tls_config(&new.scrape)
                .map_err(|e| format!("{}: scrape TLS: {e}", path.display()))?;
            Ok((new, tls))
        });
    let (new, tls) = match new {
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
    let scraper = Scraper::new(cfg.scrape_timeout, cfg.body_limit_bytes, tls, &new.scrape);
    cfg.static_targets = new.static_targets;
    cfg.file_sd = new.file_sd;
    cfg.scrape = new.scrape;
    m.reload_ok.set(1);
    m.reload_time.set(SystemClock.now_ms() / 1000);
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

fn handler(shared: Arc<Shared>) -> Handler {
    Arc::new(move |path: &str| match path {
        "/metrics" => Some(http::metrics(&shared.metrics.registry)),
        "/-/healthy" => Some(http::text(StatusCode::OK, "text/plain", "OK\n")),
        "/-/ready" if shared.ready.load(Ordering::Relaxed) => {
            Some(http::text(StatusCode::OK, "text/plain", "OK\n"))
        }
        "/-/ready" => Some(http::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "first scrape round not finished\n",
        )),
        "/" => Some(http::text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status::render(&shared.status_view()),
        )),
        _ => None,
    })
}

/// Keeps the target list current: file_sd files re-read when they change or on SIGHUP.
struct TargetSet {
    targets: Arc<Vec<Target>>,
    fingerprint: Vec<(PathBuf, u64, Option<std::time::SystemTime>)>,
    cache: targets::SdCache,
    loaded: bool,
    up: HashMap<String, bool>,
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
            let _ = m
                .target_up
                .remove_label_values(&[&key, contract_label(shared, old)]);
            if !moved {
                let _ = m.target_duration.remove_label_values(&[&key]);
                let _ = m.target_gpus.remove_label_values(&[&key]);
                for reason in ScrapeError::REASONS {
                    let _ = m.target_errors.remove_label_values(&[&key, reason]);
                }
                self.up.remove(&key);
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

async fn scrape_loop(
    shared: Arc<Shared>,
    mut cfg: AggregatorConfig,
    config_file: PathBuf,
    scraper: Scraper,
    hup: Arc<AtomicBool>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let mut set = TargetSet {
        targets: Arc::new(Vec::new()),
        fingerprint: Vec::new(),
        cache: targets::SdCache::new(),
        loaded: false,
        up: HashMap::new(),
    };
    set.refresh(&shared, &cfg, true);
    let mut tick = tokio::time::interval(cfg.scrape_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scraper = scraper;
    loop {
        tick.tick().await;
        let hupped = hup.swap(false, Ordering::Relaxed);
        if hupped {
            if let Some(new) = reload(&shared, &mut cfg, &config_file) {
                scraper = new;
            }
        }
        set.refresh(&shared, &cfg, hupped);
        let mut jobs = tokio::task::JoinSet::new();
        for i in 0..set.targets.len() {
            let (shared, scraper, limit, targets) = (
                shared.clone(),
                scraper.clone(),
                limit.clone(),
                set.targets.clone(),
            );
            jobs.spawn(async move {
                let _permit = limit.acquire().await;
                let t = &targets[i];
                let started = std::time::Instant::now();
                let result = scraper.scrape(t).await;
                let received_ms = shared.clock.now_ms();
                let took = started.elapsed();
                let up = shared.record(t, received_ms, took, &result);
                (t.key(), up, result.err().map(|e| e.to_string()))
            });
        }
        while let Some(done) = jobs.join_next().await {
            let Ok((key, up, err)) = done else { continue };
            // Log a target's state changes once, not every round.
            if set.up.insert(key.clone(), up) != Some(up) {
                match err {
                    Some(e) => tracing::warn!(scrape_target = %key, error = %e, "scrape failed"),
                    None => tracing::info!(scrape_target = %key, "scrape ok"),
                }
            }
        }
        if !shared.ready.load(Ordering::Relaxed) {
            let mut books = shared.books.lock().expect("books lock");
            books.ledger.start_after(shared.clock.now_ms());
            shared.metrics.since.set(books.ledger.since() * 60);
        }
        shared.seal_and_commit().await;
        shared.refresh_gauges();
        shared.ready.store(true, Ordering::Relaxed);
    }
}

impl Shared {
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
            .with_label_values(&[&key])
            .set(took.as_secs_f64());
        let up_series = m
            .target_up
            .with_label_values(&[&key, contract_label(self, t)]);
        self.health
            .lock()
            .expect("health lock")
            .insert(key.clone(), (t.contract, result.is_ok()));
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                up_series.set(0.0);
                m.target_errors.with_label_values(&[&key, e.reason()]).inc();
                return false;
            }
        };
        up_series.set(1.0);
        let Some(c) = t.contract else {
            m.target_gpus
                .with_label_values(&[&key])
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
            .with_label_values(&[&key])
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
                .with_label_values(&[id, why.as_str()])
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

    /// Seals what is due and makes it and the ledger's snapshot durable; only durable
    /// minutes reach the counters.
    async fn seal_and_commit(self: &Arc<Self>) {
        let now = self.clock.now_ms();
        let (sealed, snap) = {
            let mut books = self.books.lock().expect("books lock");
            let contracts = &self.contracts;
            let newly = books.ledger.seal(now, self.grace_ms, |c, a, b| {
                contracts[c].committed_gpu_ms(a, b)
            });
            books.pending.extend(newly);
            // The snapshot is written every round, not only when minutes seal: an agent
            // that dies while the aggregator is down cannot restore what it reported
            // since the last snapshot, so that window is kept to one scrape interval.
            (books.pending.clone(), books.ledger.snapshot())
        };
        let me = self.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut store = me.store.lock().expect("store lock");
            store
                .commit(&me.ids, &sealed, &snap)
                .map(|()| (sealed, snap))
        })
        .await;
        let (sealed, snap) = match written {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot write the ledger; sealed minutes kept in memory and retried");
                self.metrics
                    .store_errors
                    .with_label_values(&["commit"])
                    .inc();
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "ledger writer failed");
                self.metrics
                    .store_errors
                    .with_label_values(&["commit"])
                    .inc();
                return;
            }
        };
        let mut books = self.books.lock().expect("books lock");
        books.pending.clear();
        for s in &sealed {
            let c = &self.contracts[s.contract];
            books.running[s.contract].record(s, |t| c.billing_period(t));
        }
        for (c, contract) in self.contracts.iter().enumerate() {
            let late = snap.late.get(c).copied().unwrap_or_default();
            self.metrics
                .ledger
                .set(&contract.id, &books.running[c].all_time, late);
        }
        self.metrics.sealed_through.set(snap.sealed_through * 60);
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
        let through_ms = books.ledger.sealed_through() * MINUTE_MS;
        let since_ms = books.ledger.since() * MINUTE_MS;
        for (c, contract) in self.contracts.iter().enumerate() {
            let r = &books.running[c];
            let f = figures(r, &Self::terms(contract, r, since_ms, through_ms));
            self.metrics
                .set_period(contract, r.period_start_ms, r.period_end_ms, &r.period, &f);
            self.metrics
                .committed_gpus
                .with_label_values(&[&contract.id])
                .set(contract.committed_gpus_at(now) as f64);
            // Reachability depends on the period's length (28 to 31 days), so it follows
            // the period the figures are in.
            let period_s = (r.period_end_ms - r.period_start_ms) as f64 / 1000.0;
            for tier in crate::ledger::burn::TIERS {
                self.metrics
                    .tier_reachable
                    .with_label_values(&[&contract.id, tier.name])
                    .set(f64::from(u8::from(
                        tier.reachable(period_s, contract.target_utilization),
                    )));
            }
        }
    }

    /// What the status page shows: the same figures as the gauges, plus the sealed
    /// minutes of the period for burn rates and the chart.
    fn status_view(&self) -> status::View {
        let now_ms = self.clock.now_ms();
        let (since_ms, through_ms, running) = {
            let books = self.books.lock().expect("books lock");
            (
                books.ledger.since() * MINUTE_MS,
                books.ledger.sealed_through() * MINUTE_MS,
                books.running.clone(),
            )
        };
        let health = self.health.lock().expect("health lock").clone();
        let store = self.store.lock().expect("store lock");
        let contracts = self
            .contracts
            .iter()
            .zip(&running)
            .enumerate()
            .map(|(i, (c, r))| {
                let from = r.period_start_ms.max(since_ms).div_euclid(MINUTE_MS);
                let minutes = store
                    .minutes(&c.id, from, through_ms.div_euclid(MINUTE_MS))
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "status page: cannot read the ledger");
                        Vec::new()
                    });
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
                    figures: figures(r, &Self::terms(c, r, since_ms, through_ms)),
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
