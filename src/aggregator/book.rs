//! The aggregator's side of a shared book (`[storage] postgres`): connecting at start, with
//! backoff while the database cannot be reached; and after each round, off the scrape
//! loop, contributing this shard's closed minutes, sealing the minutes that are due (one
//! aggregator at a time, whichever gets the lease) and taking the sealed minutes back into
//! the counters, so that every aggregator of the book serves the same contract series.
//!
//! While the database is down nothing is lost here: closed minutes wait in memory (up to
//! [`super::books::MAX_PENDING_DAYS`]) and are sent when it is back. A minute the book had
//! to seal without this shard (the shard's grace ran out) refuses the late contribution;
//! that is counted (`commitmeter_book_contributed_minutes_total{result="sealed"}`), and the
//! book counted the shard's hosts unreported for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::books::SharedStart;
use super::metrics::ResultLabels;
use super::shared::{BookError, BookOptions, SealedRow, SharedBook};
use super::Shared;
use crate::contract::{Contract, PostgresSettings, ShardSpec};
use crate::ledger::{Sealed, MINUTE_MS};

/// How many closed minutes one contribution carries at most.
const CONTRIBUTE_BATCH: usize = 1440;
/// The longest wait between two connection attempts at start.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The book and this aggregator's place in it.
pub(super) struct BookSide {
    pub book: SharedBook,
    pub shard: ShardSpec,
    /// How long after its end a minute waits for every shard's contribution: the
    /// contract's `grace` (when shards close it) plus `shard_grace`.
    pub wait_ms: i64,
    /// How long past its grace a minute this process did not watch whole waits, so that a
    /// replica that did writes first: half the `shard_grace`.
    pub defer_ms: i64,
    /// A sync is running: the next round does not start another.
    busy: AtomicBool,
    /// The last failure logged, so a down database logs once, and once when it is back.
    failing: Mutex<Option<String>>,
}

impl BookSide {
    pub fn new(book: SharedBook, shard: ShardSpec, grace: Duration, shard_grace: Duration) -> Self {
        Self {
            book,
            shard,
            wait_ms: (grace + shard_grace).as_millis() as i64,
            defer_ms: (shard_grace / 2).as_millis() as i64,
            busy: AtomicBool::new(false),
            failing: Mutex::new(None),
        }
    }
}

/// The options of the book a config names; `writer` names this aggregator in it.
pub(super) fn options(pg: &PostgresSettings, shard: ShardSpec, writer: String) -> BookOptions {
    let mut o = BookOptions::new(pg.url.clone(), shard.count, writer);
    o.password_file = pg.password_file.clone();
    o.tls_ca_file = pg.tls_ca_file.clone();
    o
}

/// Connects to the book. A database that cannot be reached is retried with backoff (1 s
/// doubling to 30 s; logged when it starts failing, then at debug), unless
/// `exit_if_unreachable`; a refusal (credentials, schema, shard count) is returned at once.
pub(super) async fn connect(
    opts: &BookOptions,
    exit_if_unreachable: bool,
) -> Result<SharedBook, BookError> {
    let mut backoff = Duration::from_secs(1);
    let mut attempts = 0u32;
    loop {
        match SharedBook::connect(opts).await {
            Ok(book) => return Ok(book),
            Err(e) if e.is_unavailable() && !exit_if_unreachable => {
                attempts += 1;
                if attempts == 1 {
                    tracing::error!(error = %e, "cannot reach the shared book; retrying with backoff (up to every 30s) until it answers");
                } else {
                    tracing::debug!(error = %e, attempts, "shared book still unreachable");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// What the book holds of a contract at start, for [`super::books::Books::adopt_shared`]:
/// read for the billing period of its first unsealed minute (`now_minute` when it has none).
pub(super) async fn start_of(
    book: &SharedBook,
    contract: &Contract,
    now_minute: i64,
) -> Result<((i64, i64), SharedStart), BookError> {
    let id = &contract.id;
    let accounted = book.accounted(id).await?;
    let through = accounted.map_or(now_minute, |a| a.1);
    let period = contract.billing_period(through * MINUTE_MS);
    let from = period.0.div_euclid(MINUTE_MS);
    let (all_time, _) = book.all_time(id).await?;
    Ok((
        period,
        SharedStart {
            accounted,
            all_time,
            in_period: book.sums(id, from, through).await?,
            recent: book.minutes(id, through - 1440, through).await?,
            period_minutes: book.minutes(id, from, through).await?,
            team_all_time: book.team_all_time(id).await?,
            team_period: book.team_sums(id, from, through).await?,
        },
    ))
}

impl Shared {
    /// After a round: one exchange with the shared book in the background (none while the
    /// last is still running; a hung database holds that task only, bounded by the write
    /// deadline).
    pub(super) fn sync_book(self: &Arc<Self>) {
        let Some(side) = self.book.clone() else {
            return;
        };
        if side.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        self.runtime.spawn(async move {
            let r = match tokio::time::timeout(me.write_deadline, me.book_round(&side)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "no answer from the shared book within {}s",
                    me.write_deadline.as_secs()
                )),
            };
            me.book_outcome(&side, r);
            side.busy.store(false, Ordering::Release);
        });
    }

    /// At shutdown: one last exchange, after the one running (if any) has finished.
    pub(super) async fn last_book_round(self: &Arc<Self>) {
        let Some(side) = self.book.clone() else {
            return;
        };
        while side.busy.swap(true, Ordering::AcqRel) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = self.book_round(&side).await.map_err(|e| e.to_string());
        self.book_outcome(&side, r);
        side.busy.store(false, Ordering::Release);
    }

    /// Contribute, seal, take back: what one sync does.
    async fn book_round(self: &Arc<Self>, side: &BookSide) -> Result<(), BookError> {
        let metrics = self.metrics.book.as_ref();
        loop {
            let rows = self.books.lock().expect("books lock").contribution(
                CONTRIBUTE_BATCH,
                self.clock.now_ms(),
                side.defer_ms,
            );
            if rows.is_empty() {
                break;
            }
            let out = side.book.contribute(side.shard.index, &rows).await?;
            if let Some(m) = metrics {
                for (result, n) in [
                    ("won", out.won),
                    ("already", out.already),
                    ("sealed", out.sealed),
                ] {
                    m.contributed
                        .with(&ResultLabels { result })
                        .inc_by(n as u64);
                }
            }
            if out.sealed > 0 {
                tracing::warn!(
                    minutes = out.sealed,
                    shard = %side.shard,
                    "the shared book had sealed minutes without this shard; its hosts were counted unreported for them"
                );
            }
            let mut books = self.books.lock().expect("books lock");
            books.contributed(rows.len());
            self.metrics.pending.set(books.pending() as i64);
            if rows.len() < CONTRIBUTE_BATCH {
                break;
            }
        }
        let contracts = &self.contracts;
        let sealed = side
            .book
            .seal(
                &self.ids,
                self.clock.now_ms(),
                side.wait_ms,
                |id, from, to| {
                    contracts
                        .iter()
                        .find(|c| c.id == id)
                        .map_or(0, |c| c.committed_gpu_ms(from, to))
                },
            )
            .await?;
        if let Some(m) = metrics {
            m.sealed.inc_by(sealed.len() as u64);
        }
        let mut absorbed = 0;
        for (c, id) in self.ids.iter().enumerate() {
            let from = self.books.lock().expect("books lock").absorb_from(c);
            let rows = side.book.sealed(id, from, i64::MAX).await?;
            if rows.is_empty() {
                continue;
            }
            let rows: Vec<Sealed> = rows.into_iter().map(|r| sealed_of(c, r)).collect();
            absorbed += self.books.lock().expect("books lock").absorb(c, rows);
        }
        if absorbed > 0 {
            self.publish_durable();
            self.refresh_gauges();
            self.render_status();
            self.refresh_sizing();
        }
        Ok(())
    }

    /// Logs the book going down and coming back (once each), and sets `commitmeter_book_up`.
    fn book_outcome(&self, side: &BookSide, r: Result<(), String>) {
        let mut failing = side.failing.lock().expect("book log lock");
        match r {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!("the shared book answers again; closed minutes are contributed");
                }
            }
            Err(e) => {
                if failing.is_none() {
                    tracing::error!(error = %e, "cannot reach the shared book; closed minutes are kept in memory and sent when it answers");
                }
                *failing = Some(e);
            }
        }
        if let Some(m) = &self.metrics.book {
            m.up.set(i64::from(failing.is_none()));
        }
    }
}

/// A sealed row of the book as the books count it, for contract index `c`.
fn sealed_of(c: usize, r: SealedRow) -> Sealed {
    Sealed {
        contract: c,
        minute: r.minute,
        totals: r.totals,
        allocated: r.allocated,
        teams: r.teams,
    }
}
