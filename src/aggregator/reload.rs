//! SIGHUP: the config file re-read, and what of it applies at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::scrape::{self, Scraper};
use super::Shared;
use crate::contract::AggregatorConfig;

/// SIGHUP: re-reads the config file with the same validation as at start. A bad file
/// keeps the running config (error logged, `commitmeter_config_last_reload_successful 0`).
/// Targets, file_sd and how agents are reached (scheme, TLS files, credentials) apply at
/// once: the returned scraper replaces the running one. `[[teams]]` applies at once too,
/// to the owners of the readings recorded from then on (time already attributed keeps its
/// team). Contracts and the scrape timing
/// (interval, timeout, grace, body limit) shape the ledger and the scrape loop, and
/// `[storage]` (the book, the shard) is opened once, so they apply at the next restart (`commitmeter_config_restart_required`).
pub(super) fn reload(
    shared: &Shared,
    cfg: &mut AggregatorConfig,
    path: &std::path::Path,
) -> Option<Scraper> {
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
                &c.contracts,
                &c.storage
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
    let scraper = Scraper::new(
        cfg.scrape_timeout,
        cfg.scrape_interval,
        cfg.body_limit_bytes,
        tls,
        &client,
    );
    cfg.static_targets = new.static_targets;
    cfg.file_sd = new.file_sd;
    cfg.scrape = new.scrape;
    cfg.teams = new.teams.clone();
    shared
        .books
        .lock()
        .expect("books lock")
        .set_teams(new.teams);
    m.reload_ok.set(1);
    m.reload_time.set(shared.clock.now_ms() / 1000);
    Some(scraper)
}

pub(super) fn spawn_sighup(flag: Arc<AtomicBool>) {
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
