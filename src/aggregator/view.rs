//! What the books show: the month-to-date gauges and the status page, both from the
//! durable minutes in memory (never the database).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::Bytes;

use super::metrics::{ContractLabels, TierLabels};
use super::{status, Shared};
use crate::ledger::MINUTE_MS;

impl Shared {
    /// Renders the status page on a blocking thread, one render at a time; a request for
    /// a render while one runs makes that one run once more.
    pub(super) fn render_status(self: &Arc<Self>) {
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
        let contracts = self
            .contracts
            .iter()
            .zip(books)
            .enumerate()
            .map(|(i, (c, (r, minutes, figures)))| {
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
