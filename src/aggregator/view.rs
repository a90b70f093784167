//! What the books show: the month-to-date gauges and the status page, both from the
//! durable minutes in memory (never the database), and the page's renewal sizing, computed
//! from the ledger's last 60 days off the request path and cached.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Bytes;

use super::metrics::{ContractLabels, TierLabels};
use super::{status, Shared};
use crate::clock;
use crate::ledger::MINUTE_MS;
use crate::statement::{self, SizingSection, SIZING_MINUTES};

/// The sizing is computed again once this many more minutes are durable than at its last
/// computation: once an hour of the ledger's time.
pub const SIZING_EVERY_MINUTES: i64 = 60;

/// And at most this often in real time (the demo's clock runs up to 100,000 times faster).
const SIZING_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// The renewal sizing the status page shows: per contract, the statement's
/// ([`statement::sizing_section`]) of the minutes durable when it was computed.
#[derive(Debug, Default)]
pub(super) struct SizingCache {
    /// Per contract; `None` before the first computation or after a failed read.
    sections: Vec<Option<SizingSection>>,
    /// The lookbacks' end (the first minute not yet durable) of the last computation.
    end_minute: Option<i64>,
    /// When the last computation started (real time).
    started: Option<Instant>,
    running: bool,
}

impl Shared {
    /// Renders the status page on a blocking thread, one render at a time; a request for
    /// a render while one runs makes that one run once more.
    pub(super) fn render_status(self: &Arc<Self>) {
        self.render_again.store(true, Ordering::Release);
        if self.rendering.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        self.runtime.spawn_blocking(move || loop {
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

    /// Computes the renewal sizing of every contract again, when it is due (an hour of the
    /// ledger's minutes made durable since the last one, and [`SIZING_MIN_INTERVAL`] of real
    /// time), in the background: the last 60 days of minutes are read by the writer
    /// thread (one read at a time, between two writes, as a statement's), the sizing built
    /// on a blocking thread, then the page rendered with it. Requests never wait for it.
    pub(super) fn refresh_sizing(self: &Arc<Self>) {
        let through = self.books.lock().expect("books lock").durable_through();
        {
            let mut cache = self.sizing.lock().expect("sizing lock");
            let due = !cache.running
                && cache
                    .end_minute
                    .is_none_or(|e| through >= e + SIZING_EVERY_MINUTES)
                && cache
                    .started
                    .is_none_or(|t| clock::elapsed(t) >= SIZING_MIN_INTERVAL);
            if !due {
                return;
            }
            cache.running = true;
            cache.started = Some(clock::monotonic_now());
        }
        let me = self.clone();
        self.runtime.spawn(async move {
            let mut sections = Vec::with_capacity(me.contracts.len());
            let mut complete = true;
            for contract in &me.contracts {
                let read = me
                    .read_sealed(&contract.id, through - SIZING_MINUTES, through, None)
                    .await;
                let section = match read {
                    Ok(read) => {
                        let contract = contract.clone();
                        tokio::task::spawn_blocking(move || {
                            statement::sizing_section(&contract, &read.minutes, through)
                        })
                        .await
                        .map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e),
                };
                match section {
                    Ok(s) => sections.push(Some(s)),
                    Err(e) => {
                        tracing::warn!(contract = %contract.id, error = %e, "cannot read the ledger for the status page's renewal sizing; retried after the next write");
                        complete = false;
                        sections.push(None);
                    }
                }
            }
            {
                let mut cache = me.sizing.lock().expect("sizing lock");
                cache.running = false;
                if complete {
                    cache.sections = sections;
                    cache.end_minute = Some(through);
                }
            }
            if complete {
                me.render_status();
            }
        });
    }

    /// Month-to-date gauges from the sealed, durable minutes.
    pub(super) fn refresh_gauges(&self) {
        let now = self.clock.now_ms();
        let books = self.books.lock().expect("books lock");
        for (c, contract) in self.contracts.iter().enumerate() {
            let r = books.running(c);
            let f = books.figures(c);
            self.metrics
                .set_period(contract, r.period_start_ms, r.period_end_ms, &r.period, &f);
            self.metrics
                .teams
                .set_period(&contract.id, books.team_period(c));
            self.metrics
                .committed_gpus
                .with(&ContractLabels {
                    contract: &contract.id,
                })
                .set(contract.committed_gpus_at(now) as f64);
            self.metrics
                .usage_fallback
                .with(&ContractLabels {
                    contract: &contract.id,
                })
                .set(books.usage_fallback_gpus(c) as f64);
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
    pub(super) fn status_view(&self) -> status::View {
        let now_ms = self.clock.now_ms();
        let (since_ms, through_ms, books) = {
            let books = self.books.lock().expect("books lock");
            let per_contract: Vec<_> = (0..self.contracts.len())
                .map(|c| {
                    (
                        books.running(c).clone(),
                        books.period_minutes(c).to_vec(),
                        books.figures(c),
                        books.team_period(c),
                    )
                })
                .collect();
            (
                books.since() * MINUTE_MS,
                // Durable minutes only, as the counters: a write in flight is not shown.
                books.durable_through() * MINUTE_MS,
                per_contract,
            )
        };
        let health = self.health.lock().expect("health lock").clone();
        let sizing = self.sizing.lock().expect("sizing lock").sections.clone();
        let contracts = self
            .contracts
            .iter()
            .zip(books)
            .enumerate()
            .map(|(i, (c, (r, minutes, figures, teams)))| {
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
                    figures,
                    minutes,
                    targets_up: up,
                    targets_down: mine.count() - up,
                    periods: status::periods(c, since_ms, now_ms),
                    sizing: sizing
                        .get(i)
                        .cloned()
                        .flatten()
                        .map(|section| status::Sizing {
                            end_local: c.local_time(section.end_ms),
                            section,
                        }),
                    price_per_gpu_hour: c.price_per_gpu_hour,
                    teams,
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
