//! The aggregator's routes: `/metrics`, health, readiness, the status page and the
//! statements (`/statements/<contract>/<YYYY-MM>.csv|.json|.focus.csv`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::Bytes;
use hyper::StatusCode;

use super::Shared;
use crate::clock;
use crate::http::{self, Handler};
use crate::ledger::MINUTE_MS;
use crate::statement::{self, focus, render, LedgerInfo};

/// Every route but the statements answers from memory; a statement awaits its minutes
/// from the writer thread and is built on a blocking thread. Nothing here waits for a
/// target, and no runtime thread waits for the disk.
pub(super) fn handler(shared: Arc<Shared>) -> Handler {
    http::handler(move |path: String| {
        let shared = shared.clone();
        async move {
            match path.strip_prefix("/statements/") {
                Some(rest) => Some(shared.statement(rest).await),
                None => routes(&shared, &path),
            }
        }
    })
}

/// The formats a statement is served in, by the file name's suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Json,
    Focus,
}

impl Format {
    /// `2026-11.csv` → (`2026-11`, CSV); `None` for a suffix that is not a format.
    fn split(file: &str) -> Option<(&str, Format)> {
        [
            (".focus.csv", Format::Focus),
            (".csv", Format::Csv),
            (".json", Format::Json),
        ]
        .into_iter()
        .find_map(|(suffix, f)| file.strip_suffix(suffix).map(|p| (p, f)))
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Csv | Format::Focus => "text/csv; charset=utf-8",
            Format::Json => "application/json",
        }
    }
}

/// What a statement served over HTTP is built from: the same key, the same body. The store's
/// minutes, late GPU-ms and gaps change only with a durable write, and "now" enters a statement
/// only by the minute (days and periods end on whole minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatementKey {
    contract: usize,
    period: (i64, i64),
    format: Format,
    durable_writes: u64,
    minute: i64,
}

/// At most this many built statements are kept (the newest).
const STATEMENT_CACHE: usize = 16;

/// The statements built last, oldest first: a crowd asking for the same statement (a
/// dashboard's refresh, a finance script in a loop) costs one read and build per ledger write,
/// not one per request, so it cannot take the scraper's CPU.
#[derive(Default)]
pub(super) struct StatementCache(Vec<(StatementKey, Bytes)>);

impl StatementCache {
    fn get(&self, key: &StatementKey) -> Option<Bytes> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, b)| b.clone())
    }

    fn put(&mut self, key: StatementKey, body: Bytes) {
        self.0.retain(|(k, _)| *k != key);
        if self.0.len() >= STATEMENT_CACHE {
            self.0.remove(0);
        }
        self.0.push((key, body));
    }
}

fn refuse(status: StatusCode, why: String) -> http::Reply {
    http::text(status, "text/plain; charset=utf-8", why + "\n")
}

impl Shared {
    /// `GET /statements/<contract>/<YYYY-MM>.<format>` (`rest` is the path after
    /// `/statements/`): the statement `commitmeter statement` writes for the same ledger,
    /// built from the durable minutes. Unknown contract or format: 404; a malformed period or
    /// one out of the calendar's range: 400; a period that has not begun: 404 (no statement
    /// exists yet).
    async fn statement(self: &Arc<Self>, rest: &str) -> http::Reply {
        let Some((id, file)) = rest.split_once('/') else {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("/statements/{rest}: expected /statements/<contract>/<YYYY-MM>.csv, .json or .focus.csv"),
            );
        };
        let Some(c) = self.contracts.iter().position(|c| c.id == id) else {
            return refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "contract {id:?}: no such contract (contracts: {})",
                    self.ids.join(", ")
                ),
            );
        };
        let Some((period, format)) = Format::split(file) else {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("{file:?}: expected <YYYY-MM>.csv, .json or .focus.csv"),
            );
        };
        let (y, m) = match statement::parse_period(period) {
            Ok(ym) => ym,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("period {e}")),
        };
        let contract = &self.contracts[c];
        let Some(bounds) = contract.billing_period_of_month(y, m) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("period {period}: out of the calendar's range"),
            );
        };
        let now = self.clock.now_ms();
        if bounds.0 > now {
            return refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "period {period}: the billing period is in the future (contract {:?}'s starts {})",
                    contract.id,
                    contract.local_time(bounds.0)
                ),
            );
        }
        // What the durable minutes say, taken before the read: every minute durable now is
        // in the store when the writer thread reads, and later ones are left out, so the
        // minutes and the ledger's figures agree.
        let (mut info, durable_writes) = {
            let books = self.books.lock().expect("books lock");
            let info = LedgerInfo {
                since_minute: Some(books.since_of(c)),
                sealed_through_minute: Some(books.absorbed_through(c)),
                late: Vec::new(),
            };
            (info, books.durable_writes())
        };
        let key = StatementKey {
            contract: c,
            period: bounds,
            format,
            durable_writes,
            minute: now.div_euclid(MINUTE_MS),
        };
        let cached = self.statements.lock().expect("statements lock").get(&key);
        if let Some(body) = cached {
            return http::text(StatusCode::OK, format.content_type(), body);
        }
        let through = info.sealed_through_minute.unwrap_or(i64::MIN);
        // The period's minutes and the renewal sizing's lookback, as the CLI reads them.
        let (from, to) = statement::minutes_to_read(bounds, now);
        let read = match self
            .read_sealed(&contract.id, from, to.min(through), Some(to))
            .await
        {
            Ok(read) => {
                info.late = statement::late_by_minute(&read.late);
                read
            }
            Err(e) => {
                tracing::warn!(contract = %contract.id, error = %e, "cannot read the ledger for a statement");
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot read the ledger: {e}"),
                );
            }
        };
        let contract = contract.clone();
        let built = tokio::task::spawn_blocking(move || {
            let s = statement::build(&contract, bounds, &read.minutes, &read.gaps, &info, now);
            match format {
                Format::Csv => render::csv(&s).map_err(|e| e.to_string()),
                Format::Json => Ok(render::json(&s)),
                Format::Focus => focus::csv(&[s]).map_err(|e| e.to_string()),
            }
        })
        .await;
        match built {
            Ok(Ok(body)) => {
                let body = Bytes::from(body);
                self.statements
                    .lock()
                    .expect("statements lock")
                    .put(key, body.clone());
                http::text(StatusCode::OK, format.content_type(), body)
            }
            Ok(Err(e)) => refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot render the statement: {e}"),
            ),
            Err(e) => refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot build the statement: {e}"),
            ),
        }
    }
}

impl Shared {
    /// A contract's sealed minutes `[from, to)` with their late GPU-ms, and (with `gaps_to`)
    /// its delivery gaps overlapping `[from, gaps_to)`: from the local ledger, or, in a
    /// shared book, the minutes from the book and the gaps of this shard's hosts (the book
    /// keeps no gaps).
    pub(super) async fn read_sealed(
        &self,
        contract: &str,
        from: i64,
        to: i64,
        gaps_to: Option<i64>,
    ) -> Result<super::writer::Minutes, String> {
        let Some(side) = &self.book else {
            return self.writer.read(contract, from, to, gaps_to).await;
        };
        let gaps = match gaps_to {
            Some(_) => self.writer.read(contract, from, from, gaps_to).await?.gaps,
            None => Vec::new(),
        };
        let minutes = side
            .book
            .minutes(contract, from, to)
            .await
            .map_err(|e| e.to_string())?;
        Ok(super::writer::Minutes {
            minutes,
            late: Vec::new(),
            gaps,
        })
    }
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

impl Shared {
    /// Why the aggregator is not ready, if it is not: before the first round, while the
    /// ledger cannot be written, or while a write hangs.
    fn unready(&self) -> Option<String> {
        if !self.first_round.load(Ordering::Relaxed) {
            return Some("first scrape round not finished\n".into());
        }
        let books = self.books.lock().expect("books lock");
        if books.failing() {
            return Some(
                "the ledger cannot be written (see the log); sealed minutes are kept in memory\n"
                    .into(),
            );
        }
        match books.write_in_flight_for(clock::monotonic_now()) {
            Some(for_) if for_ > self.write_deadline => Some(format!(
                "a ledger write has not finished for {} s (is the disk hung?)\n",
                for_.as_secs()
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(durable_writes: u64) -> StatementKey {
        StatementKey {
            contract: 0,
            period: (0, 60_000),
            format: Format::Json,
            durable_writes,
            minute: 0,
        }
    }

    #[test]
    fn the_statement_cache_keeps_the_newest_and_misses_after_a_write() {
        let mut cache = StatementCache::default();
        cache.put(key(1), Bytes::from("one"));
        assert_eq!(cache.get(&key(1)), Some(Bytes::from("one")));
        assert_eq!(cache.get(&key(2)), None, "a write later: built again");
        assert_eq!(
            cache.get(&StatementKey {
                minute: 1,
                ..key(1)
            }),
            None,
            "a minute later: built again"
        );
        for w in 2..2 + STATEMENT_CACHE as u64 {
            cache.put(key(w), Bytes::from(w.to_string()));
        }
        assert_eq!(cache.0.len(), STATEMENT_CACHE);
        assert_eq!(cache.get(&key(1)), None, "the oldest went");
        cache.put(key(5), Bytes::from("five"));
        assert_eq!(cache.0.len(), STATEMENT_CACHE);
        assert_eq!(cache.get(&key(5)), Some(Bytes::from("five")));
    }
}
