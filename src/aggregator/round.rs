//! The scrape round: the target list kept current (file_sd, SIGHUP), every target
//! scraped, each result booked, then the books sealed and written; and what a round logs.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::metrics::{RejectedLabels, TargetContractLabels, TargetLabels, TargetReasonLabels};
use super::scrape::{self, HostReport, ScrapeError, Scraper};
use super::targets::{self, Target};
use super::{Shared, REJECT_LOG_EVERY_MS};
use crate::clock;
use crate::contract::AggregatorConfig;
use crate::ledger::Outcome;

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
        let mut built = targets::build(
            &shared.contracts,
            &cfg.static_targets,
            &files,
            &mut self.cache,
            cfg.scrape.scheme,
        );
        // This aggregator's shard only: the others scrape the rest (hashmod of the key).
        let shard = cfg.storage.shard;
        let listed = built.targets.len();
        built.targets.retain(|t| shard.owns(&t.key()));
        built.conflicts.retain(|(key, _)| shard.owns(key));
        for p in &built.problems {
            tracing::error!(problem = %p, "target configuration");
        }
        let m = &shared.metrics;
        m.targets_problems.set(built.problems.len() as i64);
        tracing::info!(
            targets = built.targets.len(),
            listed,
            shard = %shard,
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
            .configure(now_ms, &configured);
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

/// Scrapes of one round in flight at a time: the descriptors the scrapes hold, whatever
/// the fleet's size (see the README's file-descriptor notes).
pub(crate) const SCRAPES_IN_FLIGHT: usize = 256;

/// How long a round waits for a target refresh before scraping the last known targets.
const REFRESH_WAIT: Duration = Duration::from_secs(2);

/// The scrape loop on a thread of its own, with a single-threaded runtime. Scraping is
/// most of the aggregator's work (at 125,000 agents, ~8,000 connections a second), and on
/// the shared multi-threaded runtime it paid for work stealing, wake-ups across threads
/// and contended allocator arenas; here every scrape, its connection task and its
/// bookkeeping stay on one thread. Serving, writes and renders stay on the main runtime
/// (see `Shared::runtime`), so a slow page or disk never stalls a round.
pub(super) struct ScrapeThread {
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::sync::oneshot::Receiver<()>,
}

/// How long a stop waits for work the scrape thread left on blocking threads (a target
/// refresh on a hung file system, a large body being parsed) before leaving it behind.
const STOP_WAIT: Duration = Duration::from_secs(1);

impl ScrapeThread {
    pub(super) fn start(
        shared: Arc<Shared>,
        cfg: AggregatorConfig,
        config_file: PathBuf,
        scraper: Scraper,
        hup: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("scrape-blocking")
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (finished, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("scrape".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        _ = scrape_loop(shared, cfg, config_file, scraper, hup) => {}
                        _ = stopped => {}
                    }
                });
                // Drops the scrapes in flight: none records anything after this.
                rt.shutdown_timeout(STOP_WAIT);
                let _ = finished.send(());
            })?;
        Ok(Self { stop, done })
    }

    /// Stops scraping and waits until no scrape can record anything any more.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.done.await;
    }
}

async fn scrape_loop(
    shared: Arc<Shared>,
    cfg: AggregatorConfig,
    config_file: PathBuf,
    scraper: Scraper,
    hup: Arc<AtomicBool>,
) {
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
                    r.scraper = super::reload::reload(&sh, &mut r.cfg, &path);
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
        // At most SCRAPES_IN_FLIGHT tasks exist at a time, the next spawned as one ends:
        // spawning the whole fleet up front and queueing it on a semaphore held every
        // target's scrape future at once (hundreds of MB at 125,000 targets) and woke
        // waiters across threads for nothing.
        let mut jobs = tokio::task::JoinSet::new();
        let mut outcomes = Vec::with_capacity(targets.len());
        let mut next = 0;
        loop {
            while next < targets.len() && jobs.len() < SCRAPES_IN_FLIGHT {
                let (shared, scraper, targets) = (shared.clone(), scraper.clone(), targets.clone());
                let i = next;
                next += 1;
                jobs.spawn(async move {
                    let t = &targets[i];
                    let started = clock::monotonic_now();
                    let result = scraper.scrape(t).await;
                    let received_ms = shared.clock.now_ms();
                    let took = clock::elapsed(started);
                    shared.record(t, received_ms, took, &result);
                    (t.key(), result.err().map(|e| (e.reason(), e.to_string())))
                });
            }
            match jobs.join_next().await {
                Some(Ok(outcome)) => outcomes.push(outcome),
                Some(Err(_)) => {}
                None => break,
            }
        }
        log.round(outcomes, clock::elapsed(started));
        shared
            .metrics
            .scrape_connections
            .set(scraper.sweep_connections() as i64);
        if !shared.first_round.load(Ordering::Relaxed) {
            let mut books = shared.books.lock().expect("books lock");
            books.start_after(shared.clock.now_ms());
            if !books.is_shared() {
                shared.metrics.since.set(books.since() * 60);
            }
        }
        shared.seal_due();
        shared.start_write();
        shared.sync_book();
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
    /// Feeds one scrape's result to the ledger and the target series. Returns up.
    pub(super) fn record(
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
                if let Some(c) = t.contract {
                    self.books.lock().expect("books lock").unreachable(&key, c);
                }
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
        let (gpus, out) =
            self.books
                .lock()
                .expect("books lock")
                .record(&key, c, received_ms, report);
        m.target_gpus
            .with(&TargetLabels { target: &key })
            .set(gpus as f64);
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
                tolerance_ms = self.books.lock().expect("books lock").clock_tolerance_ms(),
                "agent clock differs from the aggregator's by more than the tolerance; its readings are placed on the aggregator's clock"
            );
        }
    }
}
